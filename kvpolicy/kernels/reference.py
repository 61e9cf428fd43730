"""Plain torch reference implementations of the compaction and ragged-attention ops.

These are the semantics the Triton kernels must reproduce exactly (gather/scatter/index ops) or to float
tolerance (attention). Segment order everywhere is batch-major: segment ``s = b * kv_heads + h``.
"""

from __future__ import annotations

import torch


def compact_heads_ref(
    keys: torch.Tensor, values: torch.Tensor, keep_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the kept entries of every (batch, kv_head) into one buffer, in token order.

    ``keys``/``values``: ``(B, H, T, D)``; ``keep_mask``: ``(B, H, T)`` bool.
    Returns ``(packed_keys (N, D), packed_values (N, D), cu_seqlens (B*H + 1,) int64)`` with
    ``N = keep_mask.sum()``; segment ``s`` occupies rows ``cu_seqlens[s]:cu_seqlens[s+1]``.
    """
    batch, heads, tokens, dim = keys.shape
    flat_keep = keep_mask.reshape(batch * heads, tokens)
    counts = flat_keep.sum(dim=1)
    cu_seqlens = torch.zeros(batch * heads + 1, dtype=torch.int64, device=keys.device)
    cu_seqlens[1:] = torch.cumsum(counts, 0)
    rows = flat_keep.reshape(-1)
    # Explicit row count: reshape(-1, dim) is ambiguous (and raises) when dim == 0.
    packed_k = keys.reshape(rows.numel(), dim)[rows]
    packed_v = values.reshape(rows.numel(), dim)[rows]
    return packed_k, packed_v, cu_seqlens


def append_ref(
    key_buf: torch.Tensor,
    value_buf: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    append_mask: torch.Tensor,
) -> None:
    """Append one entry to the segments where ``append_mask`` is True, in place.

    ``key_buf``/``value_buf``: ``(C, D)``; ``starts``/``lengths``: ``(S,)`` int64;
    ``new_keys``/``new_values``: ``(S, D)``; ``append_mask``: ``(S,)`` bool.
    Writes row ``starts[s] + lengths[s]`` and increments ``lengths[s]``. The caller guarantees capacity.
    """
    seg = torch.nonzero(append_mask, as_tuple=True)[0]
    rows = starts[seg] + lengths[seg]
    key_buf[rows] = new_keys[seg]
    value_buf[rows] = new_values[seg]
    lengths += append_mask.to(lengths.dtype)


def regrow_ref(
    key_buf: torch.Tensor,
    value_buf: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    new_capacities: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy every segment into fresh buffers with ``new_capacities`` ``(S,)`` (each >= its length).

    Returns ``(key_buf, value_buf, starts)``; lengths are unchanged. Unused rows are zero.
    """
    new_starts = torch.zeros_like(starts)
    new_starts[1:] = torch.cumsum(new_capacities, 0)[:-1]
    total = int(new_capacities.sum())
    out_k = key_buf.new_zeros((total, key_buf.shape[1]))
    out_v = value_buf.new_zeros((total, value_buf.shape[1]))
    src, dst = _segment_rows(starts, lengths), _segment_rows(new_starts, lengths)
    out_k[dst] = key_buf[src]
    out_v[dst] = value_buf[src]
    return out_k, out_v, new_starts


def _segment_rows(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row indices ``starts[s] + j`` for ``j < lengths[s]``, segments in order."""
    seg = torch.repeat_interleave(torch.arange(len(starts), device=starts.device), lengths)
    first = torch.zeros_like(lengths)
    first[1:] = torch.cumsum(lengths, 0)[:-1]
    within = torch.arange(int(lengths.sum()), device=starts.device) - first[seg]
    return starts[seg] + within


def varlen_attention_ref(
    queries: torch.Tensor,
    key_buf: torch.Tensor,
    value_buf: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each segment's queries over that segment's entries (no mask: all entries visible).

    ``queries``: ``(S, M, D)`` — for GQA, M = group size × new tokens, the group acting as heads.
    Returns ``(out (S, M, D) float32, lse (S, M) float32)``: the softmax-normalised output and the
    log-sum-exp of the logits, so that a caller can merge it with attention over other keys. Empty segments
    give ``out = 0`` and ``lse = -inf``.
    """
    segments, m, dim = queries.shape
    out = torch.zeros((segments, m, value_buf.shape[1]), dtype=torch.float32, device=queries.device)
    lse = torch.full((segments, m), float("-inf"), dtype=torch.float32, device=queries.device)
    for s in range(segments):
        n = int(lengths[s])
        if n == 0:
            continue
        start = int(starts[s])
        k = key_buf[start : start + n].float()
        v = value_buf[start : start + n].float()
        logits = queries[s].float() @ k.T * scale
        lse[s] = torch.logsumexp(logits, dim=-1)
        out[s] = torch.softmax(logits, dim=-1) @ v
    return out, lse


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-normalised attention results over disjoint key sets.

    ``out_*``: ``(..., D)``; ``lse_*``: ``(...)``. Either side may be empty (``lse = -inf``).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe).nan_to_num(0.0)
    w_b = torch.exp(lse_b - safe).nan_to_num(0.0)
    return out_a * w_a[..., None] + out_b * w_b[..., None], lse
