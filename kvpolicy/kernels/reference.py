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


# ------------------------------------------------------------------------------------------------------
# Attention statistics of a causal block of queries (KVzip+ scoring in two passes, never a (L, S) matrix)
#
# Shared conventions: ``queries`` ``(B, Hq, L, D)`` sit at absolute positions ``query_start + t``;
# ``keys``/``values`` ``(B, H, S, D)`` at positions ``0 .. S-1``, KV head ``h`` shared by query heads
# ``h*G .. h*G + G - 1`` (GQA, ``G = Hq // H``). Query ``t`` sees key ``j`` iff ``j <= query_start + t``.
# All statistics are float32 whatever the input dtype.
# ------------------------------------------------------------------------------------------------------

# Logit elements one step of the chunked torch loops may hold (2 MiB of float32): memory is O(chunk * L) or
# O(chunk * S), never O(L * S). Small enough to stay in cache: pass 2 on one CPU core ran ~1.4x faster than
# with 16 MiB steps (L = 2090 queries, 2048 keys, 8 query heads).
_CHUNK_ELEMENTS = 1 << 19


def _group_view(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B, Hq, L, D)`` → ``(B, H, G, L, D)`` (a view)."""
    batch, q_heads, length, dim = queries.shape
    return queries.reshape(batch, kv_heads, q_heads // kv_heads, length, dim)


def attention_lse_ref(queries: torch.Tensor, keys: torch.Tensor, scale: float, query_start: int) -> torch.Tensor:
    """Pass 1: ``lse[b, q, t] = log sum_{j <= query_start + t} exp(scale * q_t . k_j)``, ``(B, Hq, L)`` float32.

    ``-inf`` for a query that sees no key. Chunked over queries: one step holds ``(B, Hq, chunk, S)`` logits.
    """
    batch, q_heads, length, _ = queries.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    lse = torch.full((batch, q_heads, length), float("-inf"), dtype=torch.float32, device=queries.device)
    if length == 0 or total == 0:
        return lse
    grouped = _group_view(queries, kv_heads)
    keys_t = keys.float().transpose(-1, -2)[:, :, None]  # (B, H, 1, D, S)
    key_pos = torch.arange(total, device=keys.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, batch * q_heads * total))
    for t0 in range(0, length, step):
        t1 = min(length, t0 + step)
        visible = min(total, query_start + t1)  # keys no query of this chunk sees are skipped
        logits = torch.matmul(grouped[:, :, :, t0:t1].float(), keys_t[..., :visible]) * scale  # (B, H, G, c, s)
        if query_start + t0 < visible - 1:  # the chunk overlaps the causal diagonal
            query_pos = query_start + torch.arange(t0, t1, device=keys.device)
            logits.masked_fill_(key_pos[None, :visible] > query_pos[:, None], float("-inf"))
        lse[:, :, t0:t1] = torch.logsumexp(logits, dim=-1).reshape(batch, q_heads, t1 - t0)
    return lse


def max_attention_ref(queries: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, scale: float, query_start: int,
                      key_start: int, key_end: int, query_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pass 2: per key ``j`` in ``[key_start, key_end)`` and query head ``q``, the largest biased log attention
    weight any query gives it: ``out[b, q, j - key_start] = max_{t: j <= query_start + t} (scale * q_t . k_j
    - lse[b, q, t] + query_bias[b, t])``, ``(B, Hq, key_end - key_start)`` float32.

    With ``lse`` from pass 1 this is ``log max_t a[q, t, j] * exp(query_bias[b, t])`` (``a`` the softmax
    weight); ``query_bias`` ``(B, L)`` defaults to 0. ``-inf`` where no query sees the key.

    The per-query offset ``lse - bias`` rides in the matmul as an extra coordinate (``[q*scale, -offset] .
    [k, 1]``), so a step is one matmul and one max. Chunked over keys: one step holds
    ``(B, Hq, chunk, L)`` logits.
    """
    batch, q_heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    n_keys = key_end - key_start
    out = torch.full((batch, q_heads, n_keys), float("-inf"), dtype=torch.float32, device=queries.device)
    if length == 0 or n_keys == 0:
        return out
    offset = lse.float()
    if query_bias is not None:
        offset = offset - query_bias.float()[:, None, :]
    # (B, H, D + 1, G * L): column (g, t) is [scale * q_{g,t}, -offset_{g,t}].
    q_aug = torch.cat([queries.float() * scale, -offset[..., None]], dim=-1)
    q_aug = q_aug.reshape(batch, kv_heads, group * length, dim + 1).transpose(-1, -2)
    ones = keys.new_ones((batch, kv_heads, 1, 1), dtype=torch.float32)
    query_pos = query_start + torch.arange(length, device=queries.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, batch * q_heads * length))
    for j0 in range(key_start, key_end, step):
        j1 = min(key_end, j0 + step)
        k_aug = torch.cat([keys[:, :, j0:j1].float(), ones.expand(-1, -1, j1 - j0, 1)], dim=-1)  # (B, H, c, D+1)
        logits = torch.matmul(k_aug, q_aug).reshape(batch, kv_heads, j1 - j0, group, length)
        if j1 - 1 > query_start:  # some key of the chunk comes after the first query
            key_pos = torch.arange(j0, j1, device=queries.device)
            logits.masked_fill_((key_pos[:, None] > query_pos[None, :])[:, None, :], float("-inf"))
        best = logits.amax(dim=-1)  # (B, H, c, G)
        out[:, :, j0 - key_start:j1 - key_start] = best.permute(0, 1, 3, 2).reshape(batch, q_heads, j1 - j0)
    return out


def causal_attention_lse_ref(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                             query_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the queries and its log-sum-exp: ``(out (B, Hq, L, Dv) float32, lse (B, Hq, L)
    float32)``. Chunked over queries like :func:`attention_lse_ref`; a query that sees no key gets 0, -inf."""
    batch, q_heads, length, _ = queries.shape
    kv_heads, total, dim_v = keys.shape[1], keys.shape[2], values.shape[3]
    out = torch.zeros((batch, q_heads, length, dim_v), dtype=torch.float32, device=queries.device)
    lse = attention_lse_ref(queries, keys, scale, query_start)
    if length == 0 or total == 0:
        return out, lse
    grouped = _group_view(queries, kv_heads)
    keys_t = keys.float().transpose(-1, -2)[:, :, None]
    values_f = values.float()[:, :, None]  # (B, H, 1, S, Dv)
    key_pos = torch.arange(total, device=keys.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, batch * q_heads * total))
    for t0 in range(0, length, step):
        t1 = min(length, t0 + step)
        visible = min(total, query_start + t1)
        logits = torch.matmul(grouped[:, :, :, t0:t1].float(), keys_t[..., :visible]) * scale
        query_pos = query_start + torch.arange(t0, t1, device=keys.device)
        logits.masked_fill_(key_pos[None, :visible] > query_pos[:, None], float("-inf"))
        row_lse = lse[:, :, t0:t1].reshape(batch, kv_heads, q_heads // kv_heads, t1 - t0, 1)
        weights = torch.exp(logits - row_lse).nan_to_num_(0.0)  # rows with no key: -inf - -inf
        out[:, :, t0:t1] = torch.matmul(weights, values_f[:, :, :, :visible]).reshape(batch, q_heads, t1 - t0, dim_v)
    return out, lse


def causal_attention_lse_fused(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
                               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`causal_attention_lse_ref` with ``query_start = S - L`` through torch's fused CPU flash-attention
    op, which returns the log-sum-exp beside the output: two calls (the ``S - L`` earlier keys, all visible;
    the ``L`` query positions, causal) merged with :func:`merge_attention`. Nothing of size ``(L, S)`` is made.

    Returns ``(out (B, Hq, L, Dv) float32, lse (B, Hq, L) float32)``, or None when the op is missing (a torch
    without it) or refuses the inputs; callers then use the chunked reference.
    """
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or queries.device.type != "cpu" or queries.shape[2] == 0:
        return None
    length, total = queries.shape[2], keys.shape[2]
    group = queries.shape[1] // keys.shape[1]
    if group > 1:  # the op's GQA support varies across torch versions; repeating costs O(S * Hq * D)
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    prefix = total - length
    try:
        out, lse = op(queries, keys[:, :, prefix:], values[:, :, prefix:], 0.0, True, scale=scale)
        if prefix > 0:
            out_p, lse_p = op(queries, keys[:, :, :prefix], values[:, :, :prefix], 0.0, False, scale=scale)
            out, lse = merge_attention(out_p.float(), lse_p.float(), out.float(), lse.float())
    except RuntimeError:  # an input the op does not take (dtype, layout): not an error of ours
        return None
    return out.float(), lse.float()


# ------------------------------------------------------------------------------------------------------
# Decoding over a ragged store: one new entry per segment and step, attention over segments + a dense block
# ------------------------------------------------------------------------------------------------------

_SCALARS: dict[tuple, torch.Tensor] = {}


def _scalar(value: float | int, dtype: torch.dtype) -> torch.Tensor:
    """A cached 0-dim CPU tensor holding ``value`` in ``dtype``, to multiply or add with instead of a Python number.

    The same result bit for bit (a Python number in an op on a ``dtype`` tensor is converted to ``dtype`` the same
    way), but a Python number costs a wrapped-number tensor per call: about 1 µs of a per-step op on a CPU. Used
    for CPU tensors (accelerator ops keep their Python numbers).
    """
    key = (value, dtype)
    t = _SCALARS.get(key)
    if t is None:
        if value == 0 or value != value:  # 0.0 and -0.0 are one key, NaN never is: not cached
            return torch.tensor(value, dtype=dtype)
        if len(_SCALARS) >= 256:  # a few values per model in practice; never grow without bound
            _SCALARS.clear()
        with torch.inference_mode(False):  # a normal tensor, usable later outside inference mode too
            t = _SCALARS[key] = torch.tensor(value, dtype=dtype)
    return t


def append_spare_ref(
    key_buf: torch.Tensor,
    value_buf: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    append_mask: torch.Tensor | None,
) -> None:
    """Write every segment's new entry into its first spare row ``starts[s] + lengths[s]``, then advance
    ``lengths[s]`` where ``append_mask`` ``(S,)`` bool is True (None: every segment), in place.

    Shapes as :func:`append_ref`. Unlike :func:`append_ref` no index depends on the mask, so nothing is read
    back to the host (a GPU stream never waits). The price: a segment that does not append still gets its first
    spare row overwritten (beyond its length, so invisible), hence the caller guarantees one spare row in *every*
    segment, not only in the appending ones.
    """
    rows = starts + lengths
    key_buf.index_copy_(0, rows, new_keys)
    value_buf.index_copy_(0, rows, new_values)
    if append_mask is None:
        lengths += _scalar(1, lengths.dtype) if lengths.is_cpu else 1
    else:
        lengths += append_mask


def append_rows_ref(
    key_buf: torch.Tensor,
    value_buf: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    source_rows: torch.Tensor,
    append_mask: torch.Tensor | None,
) -> None:
    """:func:`append_spare_ref` with the new entries taken from the buffers themselves: segment ``s`` gets a copy
    of row ``source_rows[s]`` (``(S,)`` int64, not a spare row) at ``starts[s] + lengths[s]``, kept where
    ``append_mask``. Same spare-row contract."""
    rows = starts + lengths
    key_buf.index_copy_(0, rows, key_buf.index_select(0, source_rows))
    value_buf.index_copy_(0, rows, value_buf.index_select(0, source_rows))
    if append_mask is None:
        lengths += 1
    else:
        lengths += append_mask


def write_rows_ref(
    key_buf: torch.Tensor, value_buf: torch.Tensor, rows: torch.Tensor, new_keys: torch.Tensor,
    new_values: torch.Tensor,
) -> None:
    """``key_buf[rows[i]] = new_keys[i]`` (and values), in place; ``rows`` ``(N,)`` int64 distinct."""
    key_buf.index_copy_(0, rows, new_keys)
    value_buf.index_copy_(0, rows, new_values)


def prefix_segments_ref(
    key_buf: torch.Tensor,
    value_buf: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    capacities: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    prefix_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rebuild the buffers with ``prefix_rows`` rows in front of every segment's entries.

    ``prefix_keys``/``prefix_values``: ``(S, P, D)`` with ``P <= prefix_rows``; segment ``s`` becomes
    ``prefix_keys[s]`` (rows ``0 .. P-1``), ``prefix_rows - P`` zero rows, then its old entries; its capacity grows by
    ``prefix_rows`` (the spare rows stay). Returns ``(key_buf, value_buf, starts)``; lengths and capacities grow by
    ``prefix_rows`` (the caller adds it).
    """
    segments, prefix, dim = prefix_keys.shape
    new_caps = capacities + prefix_rows
    new_starts = torch.zeros_like(starts)
    new_starts[1:] = torch.cumsum(new_caps, 0)[:-1]
    total = int(new_caps.sum())
    out_k = key_buf.new_zeros((total, key_buf.shape[1]))
    out_v = value_buf.new_zeros((total, value_buf.shape[1]))
    src, dst = _segment_rows(starts, lengths), _segment_rows(new_starts + prefix_rows, lengths)
    out_k[dst] = key_buf[src]
    out_v[dst] = value_buf[src]
    rows = (new_starts[:, None] + torch.arange(prefix, device=starts.device)).reshape(-1)
    out_k[rows] = prefix_keys.reshape(segments * prefix, dim).to(out_k.dtype)
    out_v[rows] = prefix_values.reshape(segments * prefix, prefix_values.shape[2]).to(out_v.dtype)
    return out_k, out_v, new_starts


def block_attention_lse(
    queries: torch.Tensor, block_keys: torch.Tensor, block_values: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``queries (S, M, D)`` over ``block_keys``/``block_values`` ``(S, P, D)``, every entry visible:
    ``(out (S, M, Dv) float32, lse (S, M) float32)``; ``P == 0`` gives ``out = 0``, ``lse = -inf``."""
    logits = torch.matmul(queries.float(), block_keys.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(logits, dim=-1)
    if block_keys.shape[1] == 0:
        out = queries.new_zeros((*queries.shape[:2], block_values.shape[2]), dtype=torch.float32)
        return out, lse
    return torch.matmul(torch.softmax(logits, dim=-1), block_values.float()), lse


def _float32(t: torch.Tensor) -> torch.Tensor:
    # ``.float()`` on a float32 tensor returns it but still costs a dispatched op; this is called per step.
    return t if t.dtype == torch.float32 else t.float()


def _uniform_segments(key_buf: torch.Tensor, value_buf: torch.Tensor, starts: list[int], lengths: list[int]
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Strided views ``keys_t (S, D, n)`` (transposed) and ``values (S, n, D)`` of the segments when all have the
    same length ``n`` and their starts are evenly spaced by at least ``n`` rows; None otherwise (or for a single
    segment, where nothing is gained)."""
    count = len(starts)
    if count < 2:
        return None
    n, stride = lengths[0], starts[1] - starts[0]
    if stride < n or lengths.count(n) != count:
        return None
    if count > 2 and any(b - a != stride for a, b in zip(starts, starts[1:])):
        return None
    (k_row, k_col), (v_row, v_col) = key_buf.stride(), value_buf.stride()
    keys_t = key_buf.as_strided((count, key_buf.shape[1], n), (stride * k_row, k_col, k_row),
                                key_buf.storage_offset() + starts[0] * k_row)
    values = value_buf.as_strided((count, n, value_buf.shape[1]), (stride * v_row, v_row, v_col),
                                  value_buf.storage_offset() + starts[0] * v_row)
    return keys_t, values


def decode_attention_ref(
    queries: torch.Tensor,
    key_buf: torch.Tensor,
    value_buf: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    block_keys: torch.Tensor | None = None,
    block_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each segment's queries over that segment's entries and, optionally, a dense block of its own.

    ``queries``: ``(S, M, D)``; segments as :func:`varlen_attention_ref`; ``block_keys``/``block_values``:
    ``(S, P, D)`` or None, every block entry visible to every query of its segment (the HF adapter's window of
    tokens not judged yet, while it is not inside the segments). Returns ``out (S, M, Dv)`` float32, the softmax over
    all of them; a segment with nothing to attend to gives 0. No log-sum-exp: nothing is merged afterwards.

    With a block, equal to :func:`varlen_attention_ref` and :func:`block_attention_lse` merged with
    :func:`merge_attention`, but one softmax over the concatenated logits of each segment needs no log-sum-exp and
    no merge: on a CPU, where every op costs microseconds of overhead, that is about half the ops. Segment bounds
    are read to the host once per call (``tolist``), and the buffers are cut into segments by one ``split`` each.
    """
    q = _float32(queries) * (_scalar(scale, torch.float32) if queries.is_cpu else scale)
    starts_h, lengths_h = starts.tolist(), lengths.tolist()
    strided = _uniform_segments(key_buf, value_buf, starts_h, lengths_h)
    if strided is not None:
        # Equal lengths at a constant stride (nothing pruned, or the same budget for every head): (S, n, D) views
        # of the buffers, so the segments are one batched matmul instead of a loop.
        keys_t, values = strided
        logits = torch.bmm(q, _float32(keys_t))  # (S, M, n)
        if block_keys is None:
            return torch.bmm(torch.softmax(logits, dim=2), _float32(values))
        block_logits = torch.bmm(q, _float32(block_keys).transpose(1, 2))
        weights = torch.softmax(torch.cat([logits, block_logits], dim=2), dim=2)
        w_segment, w_block = weights.split([logits.shape[2], block_logits.shape[2]], dim=2)
        return torch.baddbmm(torch.bmm(w_segment, _float32(values)), w_block, _float32(block_values))
    sizes, row, ordered = [], 0, True  # split sizes: the gap before each segment, then the segment
    for start, n in zip(starts_h, lengths_h):
        ordered &= start >= row
        sizes += [start - row, n]
        row = start + n
    if ordered and row <= key_buf.shape[0]:
        sizes.append(key_buf.shape[0] - row)
        keys_t = _float32(key_buf).t().split(sizes, dim=1)[1::2]  # (D, n) per segment
        values = _float32(value_buf).split(sizes, dim=0)[1::2]
    else:  # segments out of buffer order: cut them one by one
        keys_t = [_float32(key_buf[start:start + n]).t() for start, n in zip(starts_h, lengths_h)]
        values = [_float32(value_buf[start:start + n]) for start, n in zip(starts_h, lengths_h)]
    if block_keys is None:
        return torch.stack([torch.mm(torch.softmax(torch.mm(q_s, k_t), dim=1), v)
                            for q_s, k_t, v in zip(q.unbind(0), keys_t, values)])
    block_logits = torch.matmul(q, _float32(block_keys).transpose(1, 2))  # (S, M, P)
    outs, block_weights = [], []
    for q_s, logits_b, k_t, v in zip(q.unbind(0), block_logits.unbind(0), keys_t, values):
        weights = torch.softmax(torch.cat([torch.mm(q_s, k_t), logits_b], dim=1), dim=1)  # (M, n + P)
        w_segment, w_block = weights.split([k_t.shape[1], logits_b.shape[1]], dim=1)
        outs.append(torch.mm(w_segment, v))
        block_weights.append(w_block)
    return torch.baddbmm(torch.stack(outs), torch.stack(block_weights), _float32(block_values))
