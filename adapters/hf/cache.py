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
from transformers.cache_utils import Cache  # noqa: I001 (after the version check in _compat)

from kvpolicy.adapters.hf._compat import CacheLayerCompat
from kvpolicy.adapters.hf._compat import query_length as _query_length
from kvpolicy.kernels import merge_attention
from kvpolicy.ragged import RaggedStore
from kvpolicy.selection import Decision, Selector
from kvpolicy.token_queue import TokenQueue


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
    """One decoder layer's cache under a policy (see module docstring for the layouts).

    Three states for the ragged layout:

    - *split* (prefill, chunks, padding): the pending tokens wait in a dense block, a
      :class:`~kvpolicy.token_queue.TokenQueue` ring, and attention merges the block with the store;
    - *ring* (steady decoding, entered after a decoding step that judged one token, left as soon as a forward does
      not fit): the pending window lives in a ring of ``window + 1`` rows in front of every store segment, so a step
      writes one row, attends with one softmax per segment over ``ring ∪ kept``, and copies the token that left the
      window to its segment's end if kept, without reading anything back to the host;
    - *tail* (steady decoding like *ring*, entered instead of it when the decision that starts the steady state is
      known on the host to prune nothing, as with ``threshold=-inf`` or once ratio/budget selection is past the
      prefill): every token is appended to its segment's end when it
      arrives, so the pending window is the last entries of every segment and a decision that prunes nothing moves
      nothing (no copy per step). Any other decision, a chunk or padding moves the window back to the dense block
      (split state).

    Padding is tracked on the host (``_valid`` is None while no pending token is padding), so unpadded batches
    build no mask.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, layout: Layout, backend: str = "auto") -> None:
        super().__init__()
        self.layout = Layout(layout)
        self.backend = backend
        self.seen = 0  # tokens ever appended, padding and pruned ones included
        self.new_tokens = 0  # tokens appended by the current forward
        # (B, H, P, D) not yet judged (ragged) / everything (masked)
        self._keys = TokenQueue(axis=2)
        self._values = TokenQueue(axis=2)
        self._valid: TokenQueue | None = None  # (B, P) False for padding; None while no pending token is padding
        self._padding_until = 0  # `seen` at the end of the last forward that had padding
        self.alive: torch.Tensor | None = None  # masked layout only: (B, H, P) not pruned
        self.judged = 0  # masked layout only: how many leading tokens have been judged
        self.store: RaggedStore | None = None
        self._flat: tuple | None = None  # (keys ring, (B*H, C, D) views of both rings' storage), see _flat_rings
        self._shape: tuple[int, int, int] | None = None  # (B, H, D)
        # Ring state (0 rows: split state): the pending tokens are the first `_ring_rows` entries of every store
        # segment, the oldest at offset `_ring_head`, `_ring_live` of them live.
        self._ring_rows = 0
        self._ring_head = 0
        self._ring_live = 0
        # Tail state: the pending tokens are the last `_tail` entries of every store segment.
        self._in_tail = False
        self._tail = 0

    @property
    def pending_keys(self) -> torch.Tensor | None:
        """``(B, H, P, D)``: keys not judged yet (ragged) or every key (masked), oldest first."""
        return self._steady_pending()[0] if self._ring_rows or self._in_tail else self._keys.view()

    @property
    def pending_values(self) -> torch.Tensor | None:
        return self._steady_pending()[1] if self._ring_rows or self._in_tail else self._values.view()

    @property
    def valid(self) -> torch.Tensor | None:
        """``(B, P)`` bool, False for padding among the pending tokens."""
        if self._valid is not None:
            return self._valid.view()
        if self._shape is None:
            return None
        return torch.ones((self._shape[0], self._pending()), dtype=torch.bool, device=self.device)

    def _pending(self) -> int:
        if self._ring_rows:
            return self._ring_live
        return self._tail if self._in_tail else len(self._keys)

    # -- transformers' layer interface -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, dim = key_states.shape
        self._shape = (batch, heads, dim)
        if self.layout is Layout.MASKED:
            self.alive = torch.ones((batch, heads, 0), dtype=torch.bool, device=key_states.device)
        else:
            self.store = RaggedStore.empty(batch * heads, dim, key_states.dtype, key_states.device, self.backend)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[:2] != self._shape[:2]:
            raise ValueError(
                f"batch/kv-head shape changed from {self._shape[:2]} to "
                f"{tuple(key_states.shape[:2])}; start a new cache for a new batch"
            )
        batch, heads, new, dim = key_states.shape
        if self._ring_rows:
            if new == 1 and self._ring_live < self._ring_rows:
                slot = (self._ring_head + self._ring_live) % self._ring_rows
                self.store.write_offset(slot, key_states.reshape(batch * heads, dim),
                                        value_states.reshape(batch * heads, dim))
                self._ring_live += 1
                self.seen += 1
                self.new_tokens = 1
                return key_states, value_states
            self._leave_ring()
        elif self._in_tail:
            if new == 1:
                self.store.append_one(key_states.reshape(batch * heads, dim), value_states.reshape(batch * heads, dim),
                                      None)
                self._tail += 1
                self.seen += 1
                self.new_tokens = 1
                return key_states, value_states
            self._leave_tail()
        self._keys.append(key_states)
        self._values.append(value_states)
        if self._valid is not None:
            self._valid.append(torch.ones((batch, new), dtype=torch.bool, device=self.device))
        if self.alive is not None:
            self.alive = torch.cat([self.alive, torch.ones((batch, heads, new), dtype=torch.bool, device=self.device)],
                                   2)
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
    def record_padding(self, new_valid: torch.Tensor) -> None:
        """Mark padding among the current forward's new tokens: ``new_valid (B, L)`` False for padding.

        Not called for a forward without padding (the common case costs nothing).
        """
        self._leave_steady()
        if self._valid is None:
            self._valid = TokenQueue(axis=1)
            self._valid.append(torch.ones((new_valid.shape[0], len(self._keys)), dtype=torch.bool,
                                          device=new_valid.device))
        self._valid.set_last(new_valid)
        self._padding_until = self.seen

    def attend(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of the current forward's queries over everything visible in this layer.

        ``queries``: ``(B, Hq, L, D)``. Returns ``(B, L, Hq, D)`` in the queries' dtype (HF's layout).
        """
        batch, q_heads, new, dim = queries.shape
        heads = self._shape[1]
        group = q_heads // heads
        if self._ring_rows or self._in_tail:
            if new == 1 and (self._in_tail or self._ring_live == self._ring_rows):
                # Every segment is `ring ∪ kept` (or `kept + tail`), all visible to the one query: one softmax per
                # segment.
                out = self.store.decode_attention(queries.reshape(batch * heads, group, dim), scale)
                out = out.reshape(batch, 1, q_heads, dim)  # (B*H, G, D) is HF's (B, L=1, Hq, D)
                return out if out.dtype == queries.dtype else out.to(queries.dtype)
            self._leave_steady()
        if self.layout is Layout.MASKED or not self.store.has_rows:
            return self._attend_dense(queries, scale)
        if new == 1 and self._valid is None:
            # Decoding without padding: every stored and pending entry is visible to the one query, so the order
            # of the pending tokens does not matter and a full ring is used as it lies (no copy).
            if self._keys.is_full():
                keys, values = self._flat_rings()
            else:
                keys = self.pending_keys.reshape(batch * heads, -1, dim)
                values = self.pending_values.reshape(batch * heads, -1, dim)
            out = self.store.decode_attention(queries.reshape(batch * heads, group, dim), scale, keys, values)
            # (B*H, G, D) is (B, Hq, D) is HF's (B, L=1, Hq, D): no transpose needed for one token.
            out = out.reshape(batch, 1, q_heads, dim)
            return out if out.dtype == queries.dtype else out.to(queries.dtype)
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
        heads = self._shape[1]
        if self.layout is Layout.RAGGED and new == len(self._keys) and self._valid is None:
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

    def _flat_rings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B*H, C, D)`` views of the pending rings' whole storage, made once per storage (not per step)."""
        if self._flat is None or self._flat[0] is not self._keys.buf:
            keys, values = self._keys.buf, self._values.buf
            self._flat = (keys, (keys.flatten(0, 1), values.flatten(0, 1)))
        return self._flat[1]

    def _steady_pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pending tokens of the ring or tail state, ``(B, H, P, D)`` copies, oldest first."""
        batch, heads, dim = self._shape
        if self._in_tail:
            keys, values = self.store.read_tail(self._tail)
        else:
            keys, values = self.store.read_offsets(
                [(self._ring_head + i) % self._ring_rows for i in range(self._ring_live)])
        pending = keys.shape[1]
        return keys.reshape(batch, heads, pending, dim), values.reshape(batch, heads, pending, dim)

    def _enter_ring(self) -> None:
        """Split → ring state: the pending tokens become a ring of ``P + 1`` rows in front of every segment."""
        batch, heads, dim = self._shape
        pending = len(self._keys)
        keys, values = self._keys.view(), self._values.view()
        self.store.add_prefix(keys.reshape(batch * heads, pending, dim), values.reshape(batch * heads, pending, dim),
                              pending + 1)
        self._ring_rows, self._ring_head, self._ring_live = pending + 1, 0, pending
        self._keys, self._values, self._flat = TokenQueue(axis=2), TokenQueue(axis=2), None

    def _leave_ring(self) -> None:
        """Ring → split state (a forward that is not one unpadded token per sequence)."""
        batch, heads, dim = self._shape
        offsets = [(self._ring_head + i) % self._ring_rows for i in range(self._ring_live)]
        keys, values = self.store.remove_prefix(self._ring_rows, offsets)
        self._keys.append(keys.reshape(batch, heads, len(offsets), dim))
        self._values.append(values.reshape(batch, heads, len(offsets), dim))
        self._ring_rows = self._ring_head = self._ring_live = 0

    def _enter_tail(self) -> None:
        """Split → tail state: the pending tokens are appended to every segment, where later tokens follow them."""
        batch, heads, _ = self._shape
        pending = len(self._keys)
        if pending:
            keep = torch.ones((batch, heads, pending), dtype=torch.bool, device=self.device)
            self.store.extend(self._keys.view(), self._values.view(), keep)
        self._in_tail, self._tail = True, pending
        self._keys, self._values, self._flat = TokenQueue(axis=2), TokenQueue(axis=2), None

    def _leave_tail(self) -> None:
        """Tail → split state (a forward that does not fit, or a decision that may prune)."""
        batch, heads, dim = self._shape
        keys, values = self.store.remove_tail(self._tail)
        self._keys.append(keys.reshape(batch, heads, self._tail, dim))
        self._values.append(values.reshape(batch, heads, self._tail, dim))
        self._in_tail, self._tail = False, 0

    def _leave_steady(self) -> None:
        """Ring or tail → split state; nothing in the split state."""
        if self._ring_rows:
            self._leave_ring()
        elif self._in_tail:
            self._leave_tail()

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
        # In the ring and tail states no pending token is padding, so `keeps_all` means the mask is all True.
        if self._in_tail:
            if decision.keeps_all:
                self._tail -= count  # kept where they are: they just stop being pending
                return
            self._leave_tail()
        elif self._ring_rows:
            if count == 1:
                # The oldest pending token left the window: copy it to its segment's end if kept; its ring row is
                # free for the next token.
                keep = None if decision.keeps_all else decision.keep.reshape(self.store.segments)
                self.store.append_from_offset(self._ring_head, keep)
                self._ring_head = (self._ring_head + 1) % self._ring_rows
                self._ring_live -= 1
                return
            self._leave_ring()
        if count == 1:
            # Decoding: the oldest pending token, read from the flat ring views (no per-step reshape).
            keys, values = self._flat_rings()
            segments = keys.shape[0]
            kept_all = decision.keeps_all and self._valid is None  # nothing pruned, and no padding to drop
            self.store.append_one(keys.select(1, self._keys.head), values.select(1, self._keys.head),
                                  None if kept_all else decision.keep.reshape(segments))
        else:
            self.store.extend(self._keys.front(count), self._values.front(count), decision.keep)
        # Popping moves the ring's head; the queues release a long judged prefix (a prefill's) by copying the rest.
        self._keys.pop(count)
        self._values.pop(count)
        if self._valid is not None:
            self._valid.pop(count)
            if self.seen - len(self._keys) >= self._padding_until:  # no pending token is padding any more
                self._valid = None
        if count == 1 and self.new_tokens == 1 and self._valid is None:
            # A steady decoding step: from now on one token in, one out, per step. A decision that pruned nothing
            # (padding aside) is taken to foretell the next ones: they need no ring if they keep everything too.
            if decision.keeps_all:
                self._enter_tail()
            else:
                self._enter_ring()

    def kv_bytes(self) -> int:
        """Bytes this layer holds for keys and values (ragged store, pending block with its spare room, metadata)."""
        if not self.is_initialized:
            return 0
        dense = self._keys.nbytes + self._values.nbytes
        return dense + (self.store.nbytes() if self.store is not None else 0)

    def stored_entries(self) -> int:
        """(token, head) entries physically stored, padding included."""
        if not self.is_initialized:
            return 0
        segments = self._shape[0] * self._shape[1]
        if self._ring_rows:  # the pending tokens are store entries; the ring's free row holds none
            return self.store.entries - segments * (self._ring_rows - self._ring_live)
        return segments * len(self._keys) + (self.store.entries if self.store is not None else 0)


class PolicyCache(Cache):
    """A transformers ``Cache`` whose layers apply a kvpolicy policy's decisions. Create it through a
    :class:`~kvpolicy.adapters.hf.PolicySession` (``session.new_cache()``), which also owns the selector."""

    def __init__(self, num_layers: int, selector: Selector, layout: Layout | str = Layout.RAGGED,
                 backend: str = "auto") -> None:
        super().__init__(layers=[PolicyLayer(Layout(layout), backend) for _ in range(num_layers)])
        self.selector = selector
        self.scored_layers: set[int] = set()  # layers whose first (prefill) pass has been scored
        # (B,) non-padding tokens seen per sequence; None while no forward had padding (then it is `seen`).
        self.real_seen: torch.Tensor | None = None
        self._all_valid: torch.Tensor | None = None  # see all_valid

    def all_valid(self, batch: int, new: int, device: torch.device) -> torch.Tensor:
        """``(B, L)`` True: the validity of a forward without padding, one tensor shared while the shape holds (every
        decoding step), so do not modify it."""
        valid = self._all_valid
        if valid is None or valid.shape != (batch, new) or valid.device != device:
            valid = self._all_valid = torch.ones((batch, new), dtype=torch.bool, device=device)
        return valid

    def next_positions(self, new_valid: torch.Tensor | None, start: int, batch: int, new: int,
                       device: torch.device, arange: torch.Tensor | None = None) -> torch.Tensor:
        """Positions ``(B, L)`` of a forward's new tokens, counted over each sequence's non-padding tokens.

        ``new_valid``: ``(B, L)`` False for padding, or None when there is none; ``start``: tokens seen before
        this forward; ``arange``: ``start .. start + L - 1`` if the caller has it. Call once per forward (every layer
        sees the same tokens).
        """
        if new_valid is None and self.real_seen is None:
            if arange is None:
                arange = torch.arange(start, start + new, device=device)
            return arange.expand(batch, new)
        if self.real_seen is None:
            self.real_seen = torch.full((batch,), start, dtype=torch.int64, device=device)
        if new_valid is None:
            new_valid = torch.ones((batch, new), dtype=torch.bool, device=device)
        positions = self.real_seen[:, None] + torch.cumsum(new_valid.long(), dim=1) - 1
        self.real_seen = self.real_seen + new_valid.sum(dim=1)
        return positions.clamp(min=0)

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)

    def stored_entries(self) -> int:
        return sum(layer.stored_entries() for layer in self.layers)
