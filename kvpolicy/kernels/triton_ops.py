"""Triton kernels for the compaction and ragged-attention ops, beside :mod:`kvpolicy.kernels.reference`.

Each public wrapper has the signature and semantics of the matching ``*_ref`` function (exact equality for
the gather/scatter/index ops, float tolerance for attention). Wrappers check layout and dtypes and raise
ValueError before launching. On CPU tensors they run only under ``TRITON_INTERPRET=1`` (tests do this).

Host syncs: an op whose output size depends on data must read that size on the host to allocate. These are
``compact_heads`` (N, the number of kept entries) and ``regrow`` (total new capacity and the largest
capacity, read together in one sync). ``compact_heads_into`` writes into a caller-provided buffer and syncs
nothing. ``append`` and ``varlen_attention`` never sync.

Ragged compaction is two launches: a tiny pass that counts the kept entries of every tile of ``BLOCK_T``
tokens (reads only the mask), an on-device exclusive cumsum over those tile counts, then one pass over the
keys/values in which each tile takes the prefix-sum of its mask (``tl.cumsum``) to find its destination rows.
The key/value bytes are read once and written once.

Nothing else in the package imports this module unless the Triton backend is requested.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per tile in the compaction kernels. Bigger tiles mean fewer tile counts to scan but more
# wasted lanes in short segments; 64 keeps a (64, 128) bf16 tile at 16 KiB of registers.
_BLOCK_T = 64
# Keys per inner step of the attention loop.
_BLOCK_N = 64


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    _check(all(t.device == device for t in tensors), f"all tensors must be on one device, got "
           f"{sorted({str(t.device) for t in tensors})}")


def _check_meta(name: str, t: torch.Tensor, size: int | None = None) -> None:
    """Segment metadata (starts, lengths, capacities): 1-D, contiguous, int32/int64."""
    _check(t.dim() == 1, f"{name} must be 1-D, got shape {tuple(t.shape)}")
    _check(t.dtype in (torch.int32, torch.int64), f"{name} must be int32 or int64, got {t.dtype}")
    _check(t.is_contiguous(), f"{name} must be contiguous")
    if size is not None:
        _check(t.shape[0] == size, f"{name} must have {size} entries, got {t.shape[0]}")


def _check_rows(name: str, t: torch.Tensor) -> None:
    """(rows, D) buffers: unit stride along D so a row is one contiguous load."""
    _check(t.dim() == 2, f"{name} must be 2-D (rows, head_dim), got shape {tuple(t.shape)}")
    _check(t.shape[1] == 0 or t.stride(1) == 1, f"{name} must have unit stride along head_dim, "
           f"got strides {t.stride()}")


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(n, 1)))


# ------------------------------------------------------------------------------------------------ counts


@triton.jit
def _tile_counts_kernel(
    mask_ptr, stride_mask_row,
    lengths_ptr,
    kept_ptr, dropped_ptr,
    T, n_tiles,
    HAS_LENGTHS: tl.constexpr, COUNT_DROPPED: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Per (row, tile): number of kept (and optionally dropped) in-range entries."""
    row = tl.program_id(0)
    tile = tl.program_id(1)
    offs = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    limit = T
    if HAS_LENGTHS:
        limit = tl.minimum(tl.load(lengths_ptr + row).to(tl.int32), T)
    in_range = offs < limit
    keep = tl.load(mask_ptr + row * stride_mask_row + offs, mask=offs < T, other=0) != 0
    keep = keep & in_range
    tl.store(kept_ptr + row * n_tiles + tile, tl.sum(keep.to(tl.int32), axis=0).to(tl.int64))
    if COUNT_DROPPED:
        drop = (~keep) & in_range
        tl.store(dropped_ptr + row * n_tiles + tile, tl.sum(drop.to(tl.int32), axis=0).to(tl.int64))


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    """``counts`` (n,) int64 → (n + 1,) with a leading 0; stays on device."""
    out = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts.reshape(-1), 0, out=out[1:])
    return out


# ------------------------------------------------------------------------------------------ compact_heads


@triton.jit
def _compact_heads_kernel(
    k_ptr, v_ptr, mask_ptr, tile_base_ptr, out_k_ptr, out_v_ptr, cu_ptr,
    heads, T, D, capacity, n_tiles, n_segments,
    sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sm_row,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seg = tl.program_id(0)
    tile = tl.program_id(1)
    b = seg // heads
    h = seg % heads
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    keep = tl.load(mask_ptr + seg * sm_row + offs_t, mask=offs_t < T, other=0) != 0
    # Destination row = rows taken by earlier tiles (precomputed) + kept entries before this one in the tile.
    inclusive = tl.cumsum(keep.to(tl.int32), axis=0)
    base = tl.load(tile_base_ptr + seg * n_tiles + tile)
    dst = base + (inclusive - keep.to(tl.int32)).to(tl.int64)
    # cu_seqlens comes out of this launch too (saves a separate gather launch).
    if tile == 0:
        tl.store(cu_ptr + seg, base)
    if (seg == n_segments - 1) & (tile == n_tiles - 1):
        tl.store(cu_ptr + n_segments, base + tl.sum(keep.to(tl.int32), axis=0).to(tl.int64))
    # The capacity bound keeps a too-small caller buffer from being overrun; rows past it are dropped.
    row_ok = keep & (dst < capacity)
    io_mask = row_ok[:, None] & (offs_d[None, :] < D)
    t64 = offs_t.to(tl.int64)
    src_k = k_ptr + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h + t64[:, None] * sk_t + offs_d[None, :]
    src_v = v_ptr + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h + t64[:, None] * sv_t + offs_d[None, :]
    dst_off = dst[:, None] * D + offs_d[None, :]
    tl.store(out_k_ptr + dst_off, tl.load(src_k, mask=io_mask), mask=io_mask)
    tl.store(out_v_ptr + dst_off, tl.load(src_v, mask=io_mask), mask=io_mask)


def _check_compact_heads(keys, values, keep_mask):
    _check(keys.dim() == 4, f"keys must be (batch, kv_heads, tokens, head_dim), got {tuple(keys.shape)}")
    _check(values.shape == keys.shape, f"values {tuple(values.shape)} must match keys {tuple(keys.shape)}")
    _check(keep_mask.shape == keys.shape[:3], f"keep_mask {tuple(keep_mask.shape)} must be {tuple(keys.shape[:3])}")
    _check(keep_mask.dtype == torch.bool, f"keep_mask must be bool, got {keep_mask.dtype}")
    _check(keys.dtype == values.dtype, f"keys ({keys.dtype}) and values ({values.dtype}) dtypes differ")
    _check(keys.shape[3] == 0 or (keys.stride(3) == 1 and values.stride(3) == 1),
           f"keys/values must have unit stride along head_dim, got {keys.stride()} / {values.stride()}")
    _check_device(keys, values, keep_mask)


def _launch_compact_heads(keys, values, mask2d, tile_base, out_k, out_v, n_tiles) -> torch.Tensor:
    """Pack into ``out_k``/``out_v``; returns cu_seqlens ``(S + 1,)``."""
    batch, heads, tokens, dim = keys.shape
    segments = batch * heads
    if segments == 0 or tokens == 0 or out_k.numel() == 0:
        return tile_base[::n_tiles].clone()  # segment s starts at tile s * n_tiles; nothing to move
    cu_seqlens = torch.empty(segments + 1, dtype=torch.int64, device=keys.device)
    _compact_heads_kernel[(segments, n_tiles)](
        keys, values, mask2d, tile_base, out_k, out_v, cu_seqlens,
        heads, tokens, dim, out_k.shape[0], n_tiles, segments,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        mask2d.stride(0),
        BLOCK_T=_BLOCK_T, BLOCK_D=_pow2(dim),
    )
    return cu_seqlens


def _heads_offsets(keep_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mask as (S, T) uint8, per-tile destination bases (S * n_tiles + 1,) int64, n_tiles."""
    batch, heads, tokens = keep_mask.shape
    segments = batch * heads
    mask2d = keep_mask.reshape(segments, tokens).contiguous().view(torch.uint8)
    n_tiles = max(1, triton.cdiv(tokens, _BLOCK_T))
    counts = torch.empty((segments, n_tiles), dtype=torch.int64, device=keep_mask.device)
    if segments and tokens:
        _tile_counts_kernel[(segments, n_tiles)](
            mask2d, mask2d.stride(0), mask2d, counts, counts, tokens, n_tiles,
            HAS_LENGTHS=False, COUNT_DROPPED=False, BLOCK_T=_BLOCK_T,
        )
    else:
        counts.zero_()
    return mask2d, _exclusive_cumsum(counts), n_tiles


def compact_heads(keys: torch.Tensor, values: torch.Tensor, keep_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton :func:`~kvpolicy.kernels.reference.compact_heads_ref`.

    ``keys``/``values``: ``(B, H, T, D)`` with unit stride along D (other strides free);
    ``keep_mask``: ``(B, H, T)`` bool. Returns ``(packed_keys (N, D), packed_values (N, D),
    cu_seqlens (B*H + 1,) int64)``. One host sync reads N to allocate the outputs; use
    :func:`compact_heads_into` to avoid it.
    """
    _check_compact_heads(keys, values, keep_mask)
    mask2d, tile_base, n_tiles = _heads_offsets(keep_mask)
    total = int(tile_base[-1])  # host sync: the output size depends on the mask
    dim = keys.shape[3]
    out_k = torch.empty((total, dim), dtype=keys.dtype, device=keys.device)
    out_v = torch.empty((total, dim), dtype=values.dtype, device=values.device)
    cu_seqlens = _launch_compact_heads(keys, values, mask2d, tile_base, out_k, out_v, n_tiles)
    return out_k, out_v, cu_seqlens


def compact_heads_into(keys: torch.Tensor, values: torch.Tensor, keep_mask: torch.Tensor,
                       out_keys: torch.Tensor, out_values: torch.Tensor) -> torch.Tensor:
    """Like :func:`compact_heads` but packs into caller buffers ``out_keys``/``out_values`` ``(capacity, D)``
    (contiguous, same dtype as ``keys``), with no host sync. Returns ``cu_seqlens (B*H + 1,)`` int64.

    Rows ``cu_seqlens[-1]:`` of the buffers are left untouched. If ``cu_seqlens[-1] > capacity`` the entries
    that do not fit are dropped (never written out of bounds); check ``cu_seqlens[-1]`` when it matters.
    """
    _check_compact_heads(keys, values, keep_mask)
    dim = keys.shape[3]
    for name, buf in (("out_keys", out_keys), ("out_values", out_values)):
        _check(buf.dim() == 2 and buf.shape[1] == dim, f"{name} must be (capacity, {dim}), got {tuple(buf.shape)}")
        _check(buf.dtype == keys.dtype, f"{name} must be {keys.dtype}, got {buf.dtype}")
        _check(buf.is_contiguous(), f"{name} must be contiguous")
    _check(out_keys.shape == out_values.shape, "out_keys and out_values must have the same shape")
    _check_device(keys, out_keys, out_values)
    mask2d, tile_base, n_tiles = _heads_offsets(keep_mask)
    return _launch_compact_heads(keys, values, mask2d, tile_base, out_keys, out_values, n_tiles)


# ------------------------------------------------------------------------------------------------ append


@triton.jit
def _append_kernel(
    kbuf_ptr, vbuf_ptr, starts_ptr, lengths_ptr, new_k_ptr, new_v_ptr, mask_ptr,
    D, capacity, s_kbuf, s_vbuf, s_newk, s_newv,
    BLOCK_D: tl.constexpr,
):
    seg = tl.program_id(0)
    selected = tl.load(mask_ptr + seg) != 0
    length = tl.load(lengths_ptr + seg)
    row = tl.load(starts_ptr + seg).to(tl.int64) + length.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    write = selected & (row >= 0) & (row < capacity)
    io_mask = offs_d < tl.where(write, D, 0)  # scalar predicate folded into the column bound
    k = tl.load(new_k_ptr + seg.to(tl.int64) * s_newk + offs_d, mask=io_mask)
    v = tl.load(new_v_ptr + seg.to(tl.int64) * s_newv + offs_d, mask=io_mask)
    tl.store(kbuf_ptr + row * s_kbuf + offs_d, k, mask=io_mask)
    tl.store(vbuf_ptr + row * s_vbuf + offs_d, v, mask=io_mask)
    tl.store(lengths_ptr + seg, length + selected.to(length.dtype))


def append(key_buf: torch.Tensor, value_buf: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
           new_keys: torch.Tensor, new_values: torch.Tensor, append_mask: torch.Tensor) -> None:
    """Triton :func:`~kvpolicy.kernels.reference.append_ref`: writes row ``starts[s] + lengths[s]`` of the
    selected segments and increments their ``lengths`` in place. No host sync.

    The caller guarantees capacity (as for the reference); a row outside the buffer is never written.
    """
    segments = starts.shape[0] if starts.dim() == 1 else -1
    _check_meta("starts", starts)
    _check_meta("lengths", lengths, segments)
    _check(append_mask.shape == (segments,) and append_mask.dtype == torch.bool,
           f"append_mask must be ({segments},) bool, got {tuple(append_mask.shape)} {append_mask.dtype}")
    for name, t in (("key_buf", key_buf), ("value_buf", value_buf), ("new_keys", new_keys),
                    ("new_values", new_values)):
        _check_rows(name, t)
    _check(value_buf.shape == key_buf.shape, "key_buf/value_buf must be equal (capacity, D)")
    _check(new_keys.shape == (segments, key_buf.shape[1]) and new_values.shape == new_keys.shape,
           f"new_keys/new_values must be ({segments}, {key_buf.shape[1]})")
    _check(new_keys.dtype == key_buf.dtype and new_values.dtype == value_buf.dtype,
           "new_keys/new_values must have the dtype of the buffers")
    _check_device(key_buf, value_buf, starts, lengths, new_keys, new_values, append_mask)
    if segments == 0 or key_buf.shape[1] == 0:
        return
    mask = append_mask.contiguous().view(torch.uint8)
    _append_kernel[(segments,)](
        key_buf, value_buf, starts, lengths, new_keys, new_values, mask,
        key_buf.shape[1], key_buf.shape[0], key_buf.stride(0), value_buf.stride(0),
        new_keys.stride(0), new_values.stride(0),
        BLOCK_D=_pow2(key_buf.shape[1]),
    )


# ------------------------------------------------------------------------------------------------ regrow


@triton.jit
def _regrow_kernel(
    kbuf_ptr, vbuf_ptr, starts_ptr, lengths_ptr, new_starts_ptr, caps_ptr, out_k_ptr, out_v_ptr,
    D, s_kbuf, s_vbuf,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seg = tl.program_id(0)
    tile = tl.program_id(1)
    length = tl.load(lengths_ptr + seg).to(tl.int64)
    cap = tl.load(caps_ptr + seg).to(tl.int64)
    src0 = tl.load(starts_ptr + seg).to(tl.int64)
    dst0 = tl.load(new_starts_ptr + seg).to(tl.int64)
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    col = offs_d[None, :] < D
    # Rows [length, capacity) are written as zeros here, so the output needs no separate memset.
    read = (offs_t < length)[:, None] & col
    write = (offs_t < cap)[:, None] & col
    k = tl.load(kbuf_ptr + (src0 + offs_t)[:, None] * s_kbuf + offs_d[None, :], mask=read, other=0.0)
    v = tl.load(vbuf_ptr + (src0 + offs_t)[:, None] * s_vbuf + offs_d[None, :], mask=read, other=0.0)
    dst = (dst0 + offs_t)[:, None] * D + offs_d[None, :]
    tl.store(out_k_ptr + dst, k, mask=write)
    tl.store(out_v_ptr + dst, v, mask=write)


def regrow(key_buf: torch.Tensor, value_buf: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
           new_capacities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton :func:`~kvpolicy.kernels.reference.regrow_ref`: returns ``(key_buf, value_buf, starts)`` with
    every segment copied to the front of a region of ``new_capacities[s]`` rows; unused rows are zero.

    One host sync reads the total and the largest new capacity together (output size and grid).
    """
    segments = starts.shape[0] if starts.dim() == 1 else -1
    _check_meta("starts", starts)
    _check_meta("lengths", lengths, segments)
    _check_meta("new_capacities", new_capacities, segments)
    _check_rows("key_buf", key_buf)
    _check_rows("value_buf", value_buf)
    _check(key_buf.dtype == value_buf.dtype, "key_buf and value_buf dtypes differ")
    _check(key_buf.shape[0] == value_buf.shape[0], "key_buf and value_buf must have the same number of rows")
    _check_device(key_buf, value_buf, starts, lengths, new_capacities)
    new_starts = torch.zeros_like(starts)
    if segments > 1:
        new_starts[1:] = torch.cumsum(new_capacities[:-1], 0)
    if segments == 0:
        total = max_cap = 0
    else:
        total, max_cap = (int(x) for x in torch.stack([new_capacities.sum(), new_capacities.max()]).tolist())
    out_k = torch.empty((total, key_buf.shape[1]), dtype=key_buf.dtype, device=key_buf.device)
    out_v = torch.empty((total, value_buf.shape[1]), dtype=value_buf.dtype, device=value_buf.device)
    dim = max(key_buf.shape[1], value_buf.shape[1])
    if total and dim:
        _check(key_buf.shape[1] == value_buf.shape[1], "key_buf and value_buf head_dim differ")
        _regrow_kernel[(segments, triton.cdiv(max_cap, _BLOCK_T))](
            key_buf, value_buf, starts, lengths, new_starts, new_capacities, out_k, out_v,
            key_buf.shape[1], key_buf.stride(0), value_buf.stride(0),
            BLOCK_T=_BLOCK_T, BLOCK_D=_pow2(key_buf.shape[1]),
        )
    return out_k, out_v, new_starts


# --------------------------------------------------------------------------------------- varlen_attention


@triton.jit
def _varlen_attention_kernel(
    q_ptr, kbuf_ptr, vbuf_ptr, starts_ptr, lengths_ptr, out_ptr, lse_ptr,
    M, D, DV, scale,
    s_q_seg, s_q_m, s_kbuf, s_vbuf,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    seg = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    q = tl.load(q_ptr + seg.to(tl.int64) * s_q_seg + offs_m[:, None] * s_q_m + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    start = tl.load(starts_ptr + seg).to(tl.int64)
    length = tl.load(lengths_ptr + seg).to(tl.int64)

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for n0 in range(0, length, BLOCK_N):
        n_ok = (n0 + offs_n) < length
        rows = start + n0 + offs_n
        k = tl.load(kbuf_ptr + rows[:, None] * s_kbuf + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        v = tl.load(vbuf_ptr + rows[:, None] * s_vbuf + offs_dv[None, :],
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        logits = tl.where(n_ok[None, :], logits, float("-inf"))
        # Every tile has at least one valid key, so new_max is finite and the rescale never sees inf - inf.
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        alpha = tl.exp(row_max - new_max)
        p = tl.exp(logits - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        row_max = new_max

    has_keys = row_sum > 0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, row_sum, 1.0)[:, None], 0.0)
    lse = tl.where(has_keys, row_max + tl.log(tl.where(has_keys, row_sum, 1.0)), float("-inf"))
    out_rows = seg.to(tl.int64) * M + offs_m
    tl.store(out_ptr + out_rows[:, None] * DV + offs_dv[None, :], out,
             mask=m_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(lse_ptr + out_rows, lse, mask=m_ok)


def varlen_attention(queries: torch.Tensor, key_buf: torch.Tensor, value_buf: torch.Tensor,
                     starts: torch.Tensor, lengths: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`~kvpolicy.kernels.reference.varlen_attention_ref`: ``(out (S, M, Dv) float32,
    lse (S, M) float32)``; empty segments give 0 and -inf. One program per (segment, block of M queries)
    runs an online softmax over the segment's rows; no host sync.
    """
    segments = starts.shape[0] if starts.dim() == 1 else -1
    _check(queries.dim() == 3 and queries.shape[0] == segments,
           f"queries must be ({segments}, M, D), got {tuple(queries.shape)}")
    _check_meta("starts", starts)
    _check_meta("lengths", lengths, segments)
    _check_rows("key_buf", key_buf)
    _check_rows("value_buf", value_buf)
    _check(queries.shape[2] == key_buf.shape[1],
           f"query head_dim {queries.shape[2]} differs from key head_dim {key_buf.shape[1]}")
    _check(value_buf.shape[0] == key_buf.shape[0], "key_buf and value_buf must have the same number of rows")
    _check(queries.shape[2] == 0 or queries.stride(2) == 1, "queries must have unit stride along head_dim")
    _check(all(t.is_floating_point() for t in (queries, key_buf, value_buf)), "queries/keys/values must be float")
    _check_device(queries, key_buf, value_buf, starts, lengths)
    _, m, dim = queries.shape
    dv = value_buf.shape[1]
    out = torch.empty((segments, m, dv), dtype=torch.float32, device=queries.device)
    lse = torch.empty((segments, m), dtype=torch.float32, device=queries.device)
    if segments == 0 or m == 0:
        return out, lse
    # tl.dot needs every block dimension >= 16.
    block_m = min(_pow2(m, 16), 64)
    _varlen_attention_kernel[(segments, triton.cdiv(m, block_m))](
        queries, key_buf, value_buf, starts, lengths, out, lse,
        m, dim, dv, float(scale),
        queries.stride(0), queries.stride(1), key_buf.stride(0), value_buf.stride(0),
        BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_D=_pow2(dim, 16), BLOCK_DV=_pow2(dv, 16),
    )
    return out, lse


# ------------------------------------------------------------------- attention_lse / max_attention (KVzip+)
# Two flash-style passes over a causal block of queries (conventions in kvpolicy.kernels.reference): pass 1
# is a softmax's running max/sum without the values; pass 2 walks the queries once per key block and keeps
# a running max of ``scale * q.k - offset_t``. Neither holds more than one (BLOCK, BLOCK) tile of logits.


@triton.jit
def _attention_lse_kernel(
    q_ptr, k_ptr, lse_ptr,
    q_heads, group, L, S, D, query_start, scale,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // q_heads
    hq = bh % q_heads
    h = hq // group
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + hq.to(tl.int64) * sq_h + offs_m[:, None].to(tl.int64) * sq_t
                + offs_d[None, :], mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    query_pos = query_start + offs_m
    k_base = k_ptr + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
    # Keys past the block's last query are seen by none of its queries.
    n_end = tl.minimum(S, query_start + tl.minimum(L, (tl.program_id(1) + 1) * BLOCK_M))

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        key_pos = n0 + offs_n
        k = tl.load(k_base + key_pos[:, None].to(tl.int64) * sk_t + offs_d[None, :],
                    mask=(key_pos[:, None] < n_end) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        visible = (key_pos[None, :] < n_end) & (key_pos[None, :] <= query_pos[:, None])
        logits = tl.where(visible, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        # A row that has seen no key yet keeps max -inf; shift by 0 there so no inf - inf appears.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        row_max = new_max

    seen = row_sum > 0
    lse = tl.where(seen, row_max + tl.log(tl.where(seen, row_sum, 1.0)), float("-inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * L + offs_m, lse, mask=m_ok)


@triton.jit
def _max_attention_kernel(
    q_ptr, k_ptr, offset_ptr, out_ptr,
    q_heads, group, L, D, n_keys, key_start, query_start, scale,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // q_heads
    hq = bh % q_heads
    h = hq // group
    first_key = key_start + tl.program_id(1) * BLOCK_N
    key_pos = first_key + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = key_pos < key_start + n_keys
    k = tl.load(k_ptr + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h + key_pos[:, None].to(tl.int64) * sk_t
                + offs_d[None, :], mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    q_base = q_ptr + b.to(tl.int64) * sq_b + hq.to(tl.int64) * sq_h
    offset_base = offset_ptr + bh.to(tl.int64) * L

    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    # Query t sees key j iff j <= query_start + t: queries before the block's first key are skipped.
    t_begin = (tl.maximum(first_key - query_start, 0) // BLOCK_M) * BLOCK_M
    for t0 in range(t_begin, L, BLOCK_M):
        t = t0 + offs_m
        t_ok = t < L
        q = tl.load(q_base + t[:, None].to(tl.int64) * sq_t + offs_d[None, :],
                    mask=t_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        offset = tl.load(offset_base + t, mask=t_ok, other=0.0)
        logits = tl.dot(k, tl.trans(q), input_precision="ieee") * scale - offset[None, :]
        visible = t_ok[None, :] & (key_pos[:, None] <= query_start + t[None, :])
        best = tl.maximum(best, tl.max(tl.where(visible, logits, float("-inf")), axis=1))

    tl.store(out_ptr + bh.to(tl.int64) * n_keys + (key_pos - key_start), best, mask=n_ok)


def _check_query_block(queries: torch.Tensor, keys: torch.Tensor) -> None:
    _check(queries.dim() == 4 and keys.dim() == 4, f"queries (B, Hq, L, D) and keys (B, H, S, D) must be 4-D, got "
           f"{tuple(queries.shape)} / {tuple(keys.shape)}")
    _check(queries.shape[0] == keys.shape[0] and queries.shape[3] == keys.shape[3],
           f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} differ in batch or head_dim")
    _check(keys.shape[1] > 0 and queries.shape[1] % keys.shape[1] == 0,
           f"query heads {queries.shape[1]} must be a multiple of kv heads {keys.shape[1]}")
    _check(queries.is_floating_point() and keys.is_floating_point(), "queries/keys must be float")
    _check(queries.shape[3] == 0 or (queries.stride(3) == 1 and keys.stride(3) == 1),
           f"queries/keys must have unit stride along head_dim, got {queries.stride()} / {keys.stride()}")
    _check_device(queries, keys)


def _attention_blocks(length: int) -> int:
    # tl.dot needs every block dimension >= 16.
    return min(_pow2(length, 16), 64)


def attention_lse(queries: torch.Tensor, keys: torch.Tensor, scale: float, query_start: int) -> torch.Tensor:
    """Triton :func:`~kvpolicy.kernels.reference.attention_lse_ref`: ``(B, Hq, L)`` float32. One program per
    (batch x query head, block of queries) runs an online max/sum over the keys its queries see; no sync."""
    _check_query_block(queries, keys)
    batch, q_heads, length, dim = queries.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    lse = torch.empty((batch, q_heads, length), dtype=torch.float32, device=queries.device)
    if batch * q_heads == 0 or length == 0:
        return lse
    if total == 0:
        return lse.fill_(float("-inf"))
    block_m = _attention_blocks(length)
    _attention_lse_kernel[(batch * q_heads, triton.cdiv(length, block_m))](
        queries, keys, lse,
        q_heads, q_heads // kv_heads, length, total, dim, int(query_start), float(scale),
        queries.stride(0), queries.stride(1), queries.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_D=_pow2(dim, 16),
    )
    return lse


def max_attention(queries: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, scale: float, query_start: int,
                  key_start: int, key_end: int, query_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton :func:`~kvpolicy.kernels.reference.max_attention_ref`: ``(B, Hq, key_end - key_start)`` float32.
    One program per (batch x query head, block of keys) walks the queries that see the block; no sync."""
    _check_query_block(queries, keys)
    batch, q_heads, length, dim = queries.shape
    _check(lse.shape == (batch, q_heads, length), f"lse must be {(batch, q_heads, length)}, got {tuple(lse.shape)}")
    _check(0 <= key_start <= key_end <= keys.shape[2], f"keys [{key_start}, {key_end}) outside [0, {keys.shape[2]}]")
    offset = lse.float()
    if query_bias is not None:
        _check(query_bias.shape == (batch, length), f"query_bias must be {(batch, length)}, got "
               f"{tuple(query_bias.shape)}")
        offset = offset - query_bias.float()[:, None, :]
    offset = offset.contiguous()
    _check_device(queries, keys, offset)
    n_keys = key_end - key_start
    out = torch.empty((batch, q_heads, n_keys), dtype=torch.float32, device=queries.device)
    if batch * q_heads == 0 or n_keys == 0:
        return out
    if length == 0:
        return out.fill_(float("-inf"))
    block_n = _attention_blocks(n_keys)
    _max_attention_kernel[(batch * q_heads, triton.cdiv(n_keys, block_n))](
        queries, keys, offset, out,
        q_heads, q_heads // keys.shape[1], length, dim, n_keys, int(key_start), int(query_start), float(scale),
        queries.stride(0), queries.stride(1), queries.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        BLOCK_M=_attention_blocks(length), BLOCK_N=block_n, BLOCK_D=_pow2(dim, 16),
    )
    return out
