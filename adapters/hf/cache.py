"""KV caches for HF transformers that apply a policy's keep decisions.

Two layouts with the same decisions:

- ``"ragged"`` (default): judged entries live in a :class:`~kvpolicy.ragged.RaggedStore` (each
  (batch, kv_head) its own length, pruned entries are gone); tokens not judged yet (the protected window)
  live in a small dense ``(B, H, P, D)`` block. Memory really shrinks.
- ``"masked"``: the full dense cache is kept and pruned entries are masked out of attention (what kvpress
  does). It frees nothing and exists as the reference the ragged layout is tested against.

Attention over either layout is exact softmax attention over the visible entries; new tokens keep their
original absolute positions because ``get_seq_length()`` counts every token ever seen, pruned or not.
"""

from __future__ import annotations

import enum

import torch

from kvpolicy.adapters.hf._compat import CacheLayerCompat, query_length as _query_length
from transformers.cache_utils import Cache  # noqa: I001 (after the version check in _compat)

from kvpolicy.kernels import merge_attention
from kvpolicy.ragged import RaggedStore
from kvpolicy.selection import Decision


class Layout(str, enum.Enum):
    RAGGED = "ragged"
    MASKED = "masked"


def dense_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with an explicit visibility mask, returning the log-sum-exp too.

    ``queries (B, H, M, D)``, ``keys``/``values`` ``(B, H, N, D)``, ``visible`` broadcastable to
    ``(B, H, M, N)`` bool. Returns ``(out (B, H, M, D) float32, lse (B, H, M))``; rows with nothing visible
    give ``out = 0``, ``lse = -inf``.
    """
    logits = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scale
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    return torch.matmul(probs, values.float()), lse


def _causal_visibility(valid: torch.Tensor, new_tokens: int, group: int) -> torch.Tensor:
    """``(B, 1, group * L, P)`` mask: the L newest of P tokens are causal among themselves, older ones visible.

    ``valid``: ``(B, P)`` bool (False = padding). Query rows are ordered (group, token).
    """
    total = valid.shape[1]
    old = total - new_tokens
    key_idx = torch.arange(total, device=valid.device)
    query_pos = old + torch.arange(new_tokens, device=valid.device)
    causal = key_idx[None, :] <= query_pos[:, None]  # (L, P)
    causal = causal.repeat(group, 1)  # (G*L, P)
    return (causal[None, :, :] & valid[:, None, :])[:, None]


class PolicyLayer(CacheLayerCompat):
    """One decoder layer's cache under a policy (see module docstring for the layouts)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, layout: Layout, backend: str = "auto") -> None:
        super().__init__()
        self.layout = Layout(layout)
        self.backend = backend
        self.seen = 0  # tokens ever appended, padding and pruned ones included
        self.new_tokens = 0  # tokens appended by the current forward
        self.pending_keys: torch.Tensor | None = None  # (B, H, P, D) not yet judged (ragged) / everything (masked)
        self.pending_values: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None  # (B, P) False for padding
        self.alive: torch.Tensor | None = None  # masked layout only: (B, H, P) not pruned
        self.judged = 0  # masked layout only: how many leading tokens have been judged
        self.store: RaggedStore | None = None
        self.real_seen: torch.Tensor | None = None  # (B,) non-padding tokens seen per sequence

    # -- transformers' layer interface -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, dim = key_states.shape
        self.pending_keys = key_states.new_empty((batch, heads, 0, dim))
        self.pending_values = value_states.new_empty((batch, heads, 0, dim))
        self.valid = torch.ones((batch, 0), dtype=torch.bool, device=key_states.device)
        self.alive = torch.ones((batch, heads, 0), dtype=torch.bool, device=key_states.device)
        self.real_seen = torch.zeros(batch, dtype=torch.int64, device=key_states.device)
        if self.layout is Layout.RAGGED:
            self.store = RaggedStore.empty(batch * heads, dim, key_states.dtype, key_states.device, self.backend)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[:2] != self.pending_keys.shape[:2]:
            raise ValueError(
                f"batch/kv-head shape changed from {tuple(self.pending_keys.shape[:2])} to "
                f"{tuple(key_states.shape[:2])}; start a new cache for a new batch"
            )
        batch, heads, new, _ = key_states.shape
        self.pending_keys = torch.cat([self.pending_keys, key_states], dim=2)
        self.pending_values = torch.cat([self.pending_values, value_states], dim=2)
        self.valid = torch.cat([self.valid, torch.ones((batch, new), dtype=torch.bool, device=self.device)], dim=1)
        self.alive = torch.cat([self.alive, torch.ones((batch, heads, new), dtype=torch.bool, device=self.device)], 2)
        self.seen += new
        self.new_tokens = new
        # The attention function reads this layer directly; it only needs the new states for scoring.
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        return self.seen + _query_length(query_length), 0

    def _unsupported(self, what: str):
        raise NotImplementedError(
            f"kvpolicy caches do not support {what} (pruned entries differ per sequence); "
            "use greedy or sampling generation with num_beams=1 and num_return_sequences=1"
        )

    def reorder_cache(self, beam_idx):
        self._unsupported("beam search (reorder_cache)")

    def batch_repeat_interleave(self, repeats: int):
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._unsupported("batch_select_indices")

    def crop(self, max_length: int):
        self._unsupported("crop (assisted / speculative decoding)")

    def reset(self) -> None:
        self.__init__(self.layout, self.backend)

    # -- kvpolicy ----------------------------------------------------------------------------------------
    def mark_new_valid(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Record which of the current forward's new tokens are padding (``new_valid (B, L)`` False).

        Returns the new tokens' positions ``(B, L)`` counted over non-padding tokens of each sequence.
        """
        self.valid[:, self.valid.shape[1] - self.new_tokens:] = new_valid
        positions = self.real_seen[:, None] + torch.cumsum(new_valid.long(), dim=1) - 1
        self.real_seen = self.real_seen + new_valid.sum(dim=1)
        return positions.clamp(min=0)

    def attend(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of the current forward's queries over everything visible in this layer.

        ``queries``: ``(B, Hq, L, D)``. Returns ``(B, L, Hq, D)`` in the queries' dtype (HF's layout).
        """
        batch, q_heads, new, dim = queries.shape
        heads = self.pending_keys.shape[1]
        group = q_heads // heads
        if self.layout is Layout.MASKED or self.store.entries == 0:
            return self._attend_dense(queries, scale)
        # (B, H, G*L, D): the GQA group acts as extra query rows of its KV head.
        q = queries.reshape(batch, heads, group * new, dim)
        visible = _causal_visibility(self.valid, new, group)
        out, lse = dense_attention(q, self.pending_keys, self.pending_values, visible, scale)
        out_r, lse_r = self.store.attention(q.reshape(batch * heads, group * new, dim), scale)
        out, _ = merge_attention(out, lse, out_r.reshape(out.shape), lse_r.reshape(lse.shape))
        out = out.reshape(batch, q_heads, new, dim).transpose(1, 2)
        return out.to(queries.dtype).contiguous()

    def _attend_dense(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """Everything visible is in the dense block (first prefill, or the masked layout): one fused SDPA call,
        no log-sum-exp merge needed."""
        batch, q_heads, new, _ = queries.shape
        heads = self.pending_keys.shape[1]
        if self.layout is Layout.RAGGED and new == self.pending_keys.shape[2] and bool(self.valid.all()):
            # An unpadded first prefill is plain causal attention: SDPA's causal fast path, no mask tensor.
            out = torch.nn.functional.scaled_dot_product_attention(
                queries, self.pending_keys, self.pending_values, is_causal=True, scale=scale, enable_gqa=True
            )
            return out.transpose(1, 2).contiguous()
        visible = _causal_visibility(self.valid, new, 1)  # (B, 1, L, P)
        if self.layout is Layout.MASKED:
            visible = (visible & self.alive[:, :, None, :]).repeat_interleave(q_heads // heads, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            queries, self.pending_keys, self.pending_values, attn_mask=visible, scale=scale, enable_gqa=True
        )
        # A query that sees nothing (a padding position) gets NaN from SDPA; define it as 0 like the ragged path.
        out = out.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
        return out.transpose(1, 2).contiguous()

    def apply(self, decision: Decision) -> None:
        """Apply keep decisions for the ``decision.count`` oldest tokens not judged yet."""
        count = decision.count
        if count == 0:
            return
        if self.layout is Layout.MASKED:
            start = self.judged
            self.alive[:, :, start:start + count] &= decision.keep
            self.judged += count
            return
        self.store.extend(self.pending_keys[:, :, :count], self.pending_values[:, :, :count], decision.keep)
        # Copy (not view) the remainder so the judged block's memory is released.
        self.pending_keys = self.pending_keys[:, :, count:].clone()
        self.pending_values = self.pending_values[:, :, count:].clone()
        self.valid = self.valid[:, count:].clone()
        self.alive = self.alive[:, :, count:].clone()

    def kv_bytes(self) -> int:
        """Bytes this layer holds for keys and values (ragged store, pending block, metadata)."""
        if not self.is_initialized:
            return 0
        dense = self.pending_keys.nbytes + self.pending_values.nbytes
        return dense + (self.store.nbytes() if self.store is not None else 0)

    def stored_entries(self) -> int:
        """(token, head) entries physically stored, padding included."""
        if not self.is_initialized:
            return 0
        pending = self.pending_keys.shape[0] * self.pending_keys.shape[1] * self.pending_keys.shape[2]
        return pending + (self.store.entries if self.store is not None else 0)


class PolicyCache(Cache):
    """A transformers ``Cache`` whose layers apply a kvpolicy policy's decisions. Create it through a
    :class:`~kvpolicy.adapters.hf.PolicySession` (``session.new_cache()``), which also owns the selector."""

    def __init__(self, num_layers: int, layout: Layout | str = Layout.RAGGED, backend: str = "auto") -> None:
        super().__init__(layers=[PolicyLayer(Layout(layout), backend) for _ in range(num_layers)])
        self.selector = None  # set by the session
        self.scored_layers: set[int] = set()  # layers whose first (prefill) pass has been scored

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)

    def stored_entries(self) -> int:
        return sum(layer.stored_entries() for layer in self.layers)
