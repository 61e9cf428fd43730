"""Backend selection and input validation for the kernel ops (see package docstring)."""

from __future__ import annotations

import enum
import os

import torch

from kvpolicy.kernels import reference as ref


class Backend(str, enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


def resolve_backend(backend: Backend | str, *tensors: torch.Tensor) -> Backend:
    """Pick the concrete backend for tensors on one device."""
    backend = Backend(backend)
    if backend is Backend.AUTO:
        on_cuda = all(t.is_cuda for t in tensors)
        return Backend.TRITON if on_cuda and _triton_available() else Backend.TORCH
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_same_device(*tensors: torch.Tensor) -> None:
    devices = {str(t.device) for t in tensors}
    _check(len(devices) == 1, f"all tensors must be on one device, got {sorted(devices)}")


def _check_index(name: str, t: torch.Tensor, size: int) -> None:
    """Segment metadata (starts, lengths, capacities): ``(size,)`` integer."""
    _check(t.shape == (size,), f"{name} must be ({size},), got {tuple(t.shape)}")
    _check(not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
           f"{name} must be an integer tensor, got {t.dtype}")


def _triton_ops(*tensors: torch.Tensor):
    # Off CUDA, Triton can only run through its interpreter; fail here rather than deep inside a launch.
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported)")
    try:
        from kvpolicy.kernels import triton_ops
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError(f"backend='triton' requested but the Triton kernels cannot be imported: {exc}") from exc
    return triton_ops


def compact_heads(keys, values, keep_mask, *, backend: Backend | str = Backend.AUTO):
    """Pack kept entries per (batch, kv_head); see :func:`reference.compact_heads_ref`."""
    _check(keys.dim() == 4, f"keys must be (batch, kv_heads, tokens, head_dim), got {tuple(keys.shape)}")
    _check(values.shape == keys.shape, f"values {tuple(values.shape)} must match keys {tuple(keys.shape)}")
    _check(keep_mask.shape == keys.shape[:3], f"keep_mask {tuple(keep_mask.shape)} must be {tuple(keys.shape[:3])}")
    _check(keep_mask.dtype == torch.bool, f"keep_mask must be bool, got {keep_mask.dtype}")
    _check(keys.dtype == values.dtype, f"keys ({keys.dtype}) and values ({values.dtype}) dtypes differ")
    _check_same_device(keys, values, keep_mask)
    if resolve_backend(backend, keys, values, keep_mask) is Backend.TRITON:
        return _triton_ops(keys).compact_heads(keys, values, keep_mask)
    return ref.compact_heads_ref(keys, values, keep_mask)


def append(key_buf, value_buf, starts, lengths, new_keys, new_values, append_mask, *,
           backend: Backend | str = Backend.AUTO) -> None:
    """Append one entry per selected segment, in place; see :func:`reference.append_ref`."""
    _check(starts.dim() == 1, f"starts must be (S,), got {tuple(starts.shape)}")
    segments = starts.shape[0]
    _check(key_buf.dim() == 2 and value_buf.shape == key_buf.shape, "key_buf/value_buf must be equal (capacity, D)")
    _check(new_keys.shape == (segments, key_buf.shape[1]), f"new_keys must be ({segments}, {key_buf.shape[1]})")
    _check(new_values.shape == new_keys.shape, "new_values must match new_keys")
    _check_index("starts", starts, segments)
    _check_index("lengths", lengths, segments)
    _check(append_mask.shape == (segments,), f"append_mask must be ({segments},), got {tuple(append_mask.shape)}")
    _check(append_mask.dtype == torch.bool, f"append_mask must be bool, got {append_mask.dtype}")
    _check(new_keys.dtype == key_buf.dtype and new_values.dtype == value_buf.dtype,
           f"new_keys/new_values ({new_keys.dtype}/{new_values.dtype}) must match the buffers' dtype "
           f"({key_buf.dtype}/{value_buf.dtype})")
    _check_same_device(key_buf, value_buf, starts, lengths, new_keys, new_values, append_mask)
    if resolve_backend(backend, key_buf, new_keys) is Backend.TRITON:
        return _triton_ops(key_buf).append(key_buf, value_buf, starts, lengths, new_keys, new_values, append_mask)
    return ref.append_ref(key_buf, value_buf, starts, lengths, new_keys, new_values, append_mask)


def regrow(key_buf, value_buf, starts, lengths, new_capacities, *, backend: Backend | str = Backend.AUTO):
    """Copy segments into buffers with new capacities; see :func:`reference.regrow_ref`."""
    _check(starts.dim() == 1, f"starts must be (S,), got {tuple(starts.shape)}")
    segments = starts.shape[0]
    _check_index("starts", starts, segments)
    _check_index("lengths", lengths, segments)
    _check_index("new_capacities", new_capacities, segments)
    _check(key_buf.dim() == 2 and value_buf.shape == key_buf.shape, "key_buf/value_buf must be equal (capacity, D)")
    _check(key_buf.dtype == value_buf.dtype,
           f"key_buf ({key_buf.dtype}) and value_buf ({value_buf.dtype}) dtypes differ")
    _check_same_device(key_buf, value_buf, starts, lengths, new_capacities)
    # One host sync; regrow is rare (capacity grows geometrically) and must allocate anyway.
    _check(bool((new_capacities >= lengths).all()), "new_capacities must be >= lengths for every segment")
    if resolve_backend(backend, key_buf) is Backend.TRITON:
        return _triton_ops(key_buf).regrow(key_buf, value_buf, starts, lengths, new_capacities)
    return ref.regrow_ref(key_buf, value_buf, starts, lengths, new_capacities)


def varlen_attention(queries, key_buf, value_buf, starts, lengths, scale: float, *,
                     backend: Backend | str = Backend.AUTO):
    """Per-segment attention with log-sum-exp; see :func:`reference.varlen_attention_ref`."""
    _check(starts.dim() == 1, f"starts must be (S,), got {tuple(starts.shape)}")
    segments = starts.shape[0]
    _check(queries.dim() == 3 and queries.shape[0] == segments,
           f"queries must be ({segments}, M, D), got {tuple(queries.shape)}")
    _check(key_buf.dim() == 2 and value_buf.dim() == 2 and value_buf.shape[0] == key_buf.shape[0],
           f"key_buf/value_buf must be (capacity, D) with equal rows, got {tuple(key_buf.shape)} / "
           f"{tuple(value_buf.shape)}")
    _check(queries.shape[2] == key_buf.shape[1],
           f"query head_dim {queries.shape[2]} differs from key head_dim {key_buf.shape[1]}")
    _check_index("starts", starts, segments)
    _check_index("lengths", lengths, segments)
    _check(all(t.is_floating_point() for t in (queries, key_buf, value_buf)), "queries/keys/values must be float")
    _check_same_device(queries, key_buf, value_buf, starts, lengths)
    if resolve_backend(backend, queries, key_buf) is Backend.TRITON:
        return _triton_ops(queries).varlen_attention(queries, key_buf, value_buf, starts, lengths, scale)
    return ref.varlen_attention_ref(queries, key_buf, value_buf, starts, lengths, scale)


# ------------------------------------------------------------------------------------------------------
# KVzip+ scoring in two passes (conventions in kvpolicy.kernels.reference: queries at positions
# query_start + t, causal over keys 0 .. S-1, GQA group = Hq // H)
# ------------------------------------------------------------------------------------------------------
def _check_query_block(queries: torch.Tensor, keys: torch.Tensor, query_start: int) -> None:
    _check(queries.dim() == 4, f"queries must be (batch, q_heads, L, head_dim), got {tuple(queries.shape)}")
    _check(keys.dim() == 4, f"keys must be (batch, kv_heads, S, head_dim), got {tuple(keys.shape)}")
    _check(queries.shape[0] == keys.shape[0], f"batch differs: queries {queries.shape[0]}, keys {keys.shape[0]}")
    _check(queries.shape[3] == keys.shape[3],
           f"query head_dim {queries.shape[3]} differs from key head_dim {keys.shape[3]}")
    _check(keys.shape[1] > 0 and queries.shape[1] % keys.shape[1] == 0,
           f"query heads ({queries.shape[1]}) must be a multiple of kv heads ({keys.shape[1]})")
    _check(queries.is_floating_point() and keys.is_floating_point(), "queries/keys must be float")
    _check(query_start >= 0, f"query_start must be >= 0, got {query_start}")
    _check_same_device(queries, keys)


def attention_lse(queries, keys, scale: float, *, query_start: int, backend: Backend | str = Backend.AUTO):
    """Pass 1: log-sum-exp of every query's causal logits, ``(B, Hq, L)`` float32; see
    :func:`reference.attention_lse_ref`."""
    _check_query_block(queries, keys, query_start)
    if resolve_backend(backend, queries, keys) is Backend.TRITON:
        return _triton_ops(queries).attention_lse(queries, keys, scale, query_start)
    return ref.attention_lse_ref(queries, keys, scale, query_start)


def max_attention(queries, keys, lse, scale: float, *, query_start: int, key_start: int = 0,
                  key_end: int | None = None, query_bias=None, backend: Backend | str = Backend.AUTO):
    """Pass 2: per key of ``[key_start, key_end)`` (default: all) the max over the queries that see it of
    ``scale * q.k - lse + query_bias``, ``(B, Hq, key_end - key_start)`` float32; see
    :func:`reference.max_attention_ref`."""
    _check_query_block(queries, keys, query_start)
    batch, q_heads, length, _ = queries.shape
    key_end = keys.shape[2] if key_end is None else key_end
    _check(0 <= key_start <= key_end <= keys.shape[2],
           f"key range [{key_start}, {key_end}) must lie within [0, {keys.shape[2]}]")
    _check(lse.shape == (batch, q_heads, length), f"lse must be {(batch, q_heads, length)}, got {tuple(lse.shape)}")
    _check(lse.is_floating_point(), f"lse must be float, got {lse.dtype}")
    tensors = [queries, keys, lse]
    if query_bias is not None:
        _check(query_bias.shape == (batch, length),
               f"query_bias must be (batch, L) = {(batch, length)}, got {tuple(query_bias.shape)}")
        tensors.append(query_bias)
    _check_same_device(*tensors)
    if resolve_backend(backend, queries, keys) is Backend.TRITON:
        return _triton_ops(queries).max_attention(queries, keys, lse, scale, query_start, key_start, key_end,
                                                  query_bias)
    return ref.max_attention_ref(queries, keys, lse, scale, query_start, key_start, key_end, query_bias)


def causal_attention_lse(queries, keys, values, scale: float, *, backend: Backend | str = Backend.AUTO):
    """Causal attention of the last ``L`` positions (``query_start = S - L``) with its log-sum-exp:
    ``(out (B, Hq, L, Dv) float32, lse (B, Hq, L) float32)``, as :func:`reference.causal_attention_lse_ref`.

    Torch backend: torch's fused CPU flash-attention op where it takes the inputs
    (:func:`reference.causal_attention_lse_fused`), else the chunked reference. Triton backend: the output
    from torch's SDPA (bottom-right causal mask), the log-sum-exp from the Triton :func:`attention_lse`.
    """
    _check(queries.dim() == 4 and keys.dim() == 4, f"queries (B, Hq, L, D) and keys (B, H, S, D) must be 4-D, got "
           f"{tuple(queries.shape)} / {tuple(keys.shape)}")
    _check(values.dim() == 4 and values.shape[:3] == keys.shape[:3],
           f"values must be (batch, kv_heads, S, Dv) like keys {tuple(keys.shape)}, got {tuple(values.shape)}")
    _check(queries.shape[2] <= keys.shape[2],
           f"the {queries.shape[2]} queries must be the last of the keys' {keys.shape[2]} positions")
    query_start = keys.shape[2] - queries.shape[2]
    _check_query_block(queries, keys, query_start)
    _check_same_device(queries, keys, values)
    if resolve_backend(backend, queries, keys, values) is Backend.TRITON:
        from torch.nn.attention.bias import causal_lower_right

        lse = _triton_ops(queries).attention_lse(queries, keys, scale, query_start)
        group = queries.shape[1] // keys.shape[1]
        # A lower-right causal bias is no materialised (L, S) mask on CUDA: SDPA picks a causal kernel.
        out = torch.nn.functional.scaled_dot_product_attention(
            queries, keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1),
            attn_mask=causal_lower_right(queries.shape[2], keys.shape[2]), scale=scale)
        return out.float(), lse
    fused = ref.causal_attention_lse_fused(queries, keys, values, scale)
    if fused is not None:
        return fused
    return ref.causal_attention_lse_ref(queries, keys, values, scale, query_start)


# ------------------------------------------------------------------------------------------------------
# Decoding over a ragged store (see the same section of kvpolicy.kernels.reference)
#
# These run once per layer and decoding step, where a few microseconds of Python are a visible share of a CPU
# step: the checks below build their messages only when they fail, and the hottest ops first test all their
# conditions in one expression (no calls), running the checks that name the problem only when it is false.
# ------------------------------------------------------------------------------------------------------
def _fail_unless(ok: bool, message) -> None:
    """Raise ValueError(message()) when not ``ok``; ``message`` is a callable, so nothing is formatted on success."""
    if not ok:
        raise ValueError(message())


def _check_one_device(*tensors: torch.Tensor) -> None:
    # CPU vs CUDA is the mix-up worth a clear message here; torch itself refuses two different CUDA devices.
    on_cuda = tensors[0].is_cuda
    if any(t.is_cuda != on_cuda for t in tensors):
        _check_same_device(*tensors)


def _torch_backend(backend: Backend | str, tensor: torch.Tensor) -> bool:
    """:func:`resolve_backend` for the common cases without its cost: auto on a CPU tensor is torch."""
    if backend == "auto" and not tensor.is_cuda:
        return True
    return resolve_backend(backend, tensor) is Backend.TORCH


def _check_segments(starts: torch.Tensor, lengths: torch.Tensor) -> int:
    segments = starts.shape[0] if starts.dim() == 1 else -1
    _fail_unless(segments >= 0 and lengths.shape == starts.shape,
                 lambda: f"starts/lengths must be (S,), got {tuple(starts.shape)} / {tuple(lengths.shape)}")
    _fail_unless(starts.dtype == torch.int64 and lengths.dtype == torch.int64,
                 lambda: f"starts/lengths must be int64, got {starts.dtype} / {lengths.dtype}")
    return segments


def append_spare(key_buf, value_buf, starts, lengths, new_keys, new_values, append_mask=None, *,
                 backend: Backend | str = Backend.AUTO) -> None:
    """Write one entry per segment into its first spare row, advance ``lengths`` where ``append_mask`` (None:
    everywhere); see :func:`reference.append_spare_ref`. Every segment needs a spare row (the caller checks).

    Both backends run the same torch ops (an index computation and two ``index_copy_``): they read nothing back
    to the host on any device, so there is no Triton kernel to add.
    """
    # The checks of _check_append_spare in one expression (the per-step cost), which names the problem when false.
    shape, rows, on_cuda = starts.shape, key_buf.shape, key_buf.is_cuda
    if not (len(shape) == 1 and lengths.shape == shape and starts.dtype == torch.int64
            and lengths.dtype == torch.int64 and len(rows) == 2 and value_buf.dim() == 2
            and value_buf.shape[0] == rows[0] and new_keys.shape == (shape[0], rows[1])
            and new_values.shape == (shape[0], value_buf.shape[1]) and new_keys.dtype == key_buf.dtype
            and new_values.dtype == value_buf.dtype and value_buf.is_cuda == on_cuda and starts.is_cuda == on_cuda
            and lengths.is_cuda == on_cuda and new_keys.is_cuda == on_cuda and new_values.is_cuda == on_cuda
            and (append_mask is None or (append_mask.shape == shape and append_mask.dtype == torch.bool
                                         and append_mask.is_cuda == on_cuda))):
        _check_append_spare(key_buf, value_buf, starts, lengths, new_keys, new_values, append_mask)
    _torch_backend(backend, key_buf)  # validates the name; both backends run the torch ops
    ref.append_spare_ref(key_buf, value_buf, starts, lengths, new_keys, new_values, append_mask)


def _check_append_spare(key_buf, value_buf, starts, lengths, new_keys, new_values, append_mask) -> None:
    segments = _check_segments(starts, lengths)
    _fail_unless(key_buf.dim() == 2 and value_buf.dim() == 2 and value_buf.shape[0] == key_buf.shape[0],
                 lambda: f"key_buf/value_buf must be (capacity, D) with equal rows, got {tuple(key_buf.shape)} / "
                         f"{tuple(value_buf.shape)}")
    _fail_unless(new_keys.shape == (segments, key_buf.shape[1]) and new_values.shape == (segments, value_buf.shape[1]),
                 lambda: f"new_keys/new_values must be ({segments}, D), got {tuple(new_keys.shape)} / "
                         f"{tuple(new_values.shape)}")
    _fail_unless(new_keys.dtype == key_buf.dtype and new_values.dtype == value_buf.dtype,
                 lambda: f"new_keys/new_values ({new_keys.dtype}/{new_values.dtype}) must match the buffers' dtype "
                         f"({key_buf.dtype}/{value_buf.dtype})")
    if append_mask is None:
        _check_one_device(key_buf, value_buf, starts, lengths, new_keys, new_values)
    else:
        _fail_unless(append_mask.shape == (segments,) and append_mask.dtype == torch.bool,
                     lambda: f"append_mask must be ({segments},) bool, got {tuple(append_mask.shape)} "
                             f"{append_mask.dtype}")
        _check_one_device(key_buf, value_buf, starts, lengths, new_keys, new_values, append_mask)


def append_rows(key_buf, value_buf, starts, lengths, source_rows, append_mask=None, *,
                backend: Backend | str = Backend.AUTO) -> None:
    """Append a copy of row ``source_rows[s]`` to every segment ``s`` (advancing ``lengths`` where ``append_mask``);
    see :func:`reference.append_rows_ref`. Torch ops on every backend (nothing is read back to the host)."""
    # The checks of _check_append_rows in one expression (the per-step cost), which names the problem when false.
    shape, on_cuda = starts.shape, key_buf.is_cuda
    if not (len(shape) == 1 and lengths.shape == shape and starts.dtype == torch.int64
            and lengths.dtype == torch.int64 and key_buf.dim() == 2 and value_buf.dim() == 2
            and value_buf.shape[0] == key_buf.shape[0] and source_rows.shape == shape
            and source_rows.dtype == torch.int64 and value_buf.is_cuda == on_cuda and starts.is_cuda == on_cuda
            and lengths.is_cuda == on_cuda and source_rows.is_cuda == on_cuda
            and (append_mask is None or (append_mask.shape == shape and append_mask.dtype == torch.bool
                                         and append_mask.is_cuda == on_cuda))):
        _check_append_rows(key_buf, value_buf, starts, lengths, source_rows, append_mask)
    _torch_backend(backend, key_buf)
    ref.append_rows_ref(key_buf, value_buf, starts, lengths, source_rows, append_mask)


def _check_append_rows(key_buf, value_buf, starts, lengths, source_rows, append_mask) -> None:
    segments = _check_segments(starts, lengths)
    _fail_unless(key_buf.dim() == 2 and value_buf.dim() == 2 and value_buf.shape[0] == key_buf.shape[0],
                 lambda: f"key_buf/value_buf must be (capacity, D) with equal rows, got {tuple(key_buf.shape)} / "
                         f"{tuple(value_buf.shape)}")
    _fail_unless(source_rows.shape == (segments,) and source_rows.dtype == torch.int64,
                 lambda: f"source_rows must be ({segments},) int64, got {tuple(source_rows.shape)} {source_rows.dtype}")
    if append_mask is None:
        _check_one_device(key_buf, value_buf, starts, lengths, source_rows)
    else:
        _fail_unless(append_mask.shape == (segments,) and append_mask.dtype == torch.bool,
                     lambda: f"append_mask must be ({segments},) bool, got {tuple(append_mask.shape)} "
                             f"{append_mask.dtype}")
        _check_one_device(key_buf, value_buf, starts, lengths, source_rows, append_mask)


def write_rows(key_buf, value_buf, rows, new_keys, new_values, *, backend: Backend | str = Backend.AUTO) -> None:
    """``key_buf[rows] = new_keys``, ``value_buf[rows] = new_values`` in place (``rows`` ``(N,)`` int64, distinct);
    see :func:`reference.write_rows_ref`. Torch ops on every backend (nothing is read back to the host)."""
    # The checks of _check_write_rows in one expression (the per-step cost), which names the problem when false.
    shape, on_cuda = rows.shape, key_buf.is_cuda
    if not (len(shape) == 1 and rows.dtype == torch.int64 and new_keys.shape == (shape[0], key_buf.shape[1])
            and new_values.shape == (shape[0], value_buf.shape[1]) and new_keys.dtype == key_buf.dtype
            and new_values.dtype == value_buf.dtype and value_buf.is_cuda == on_cuda and rows.is_cuda == on_cuda
            and new_keys.is_cuda == on_cuda and new_values.is_cuda == on_cuda):
        _check_write_rows(key_buf, value_buf, rows, new_keys, new_values)
    _torch_backend(backend, key_buf)
    ref.write_rows_ref(key_buf, value_buf, rows, new_keys, new_values)


def _check_write_rows(key_buf, value_buf, rows, new_keys, new_values) -> None:
    _fail_unless(rows.dim() == 1 and rows.dtype == torch.int64, lambda: f"rows must be (N,) int64, got "
                 f"{tuple(rows.shape)} {rows.dtype}")
    _fail_unless(new_keys.shape == (rows.shape[0], key_buf.shape[1])
                 and new_values.shape == (rows.shape[0], value_buf.shape[1]),
                 lambda: f"new_keys/new_values must be ({rows.shape[0]}, D), got {tuple(new_keys.shape)} / "
                         f"{tuple(new_values.shape)}")
    _fail_unless(new_keys.dtype == key_buf.dtype and new_values.dtype == value_buf.dtype,
                 lambda: f"new_keys/new_values ({new_keys.dtype}/{new_values.dtype}) must match the buffers' dtype "
                         f"({key_buf.dtype}/{value_buf.dtype})")
    _check_one_device(key_buf, value_buf, rows, new_keys, new_values)


def prefix_segments(key_buf, value_buf, starts, lengths, capacities, prefix_keys, prefix_values, prefix_rows: int, *,
                    backend: Backend | str = Backend.AUTO):
    """Rebuild the buffers with ``prefix_rows`` rows in front of every segment, the first ``P`` from
    ``prefix_keys``/``prefix_values`` ``(S, P, D)``; see :func:`reference.prefix_segments_ref`. Torch ops on every
    backend (it runs once per generation, not per step)."""
    segments = _check_segments(starts, lengths)
    _fail_unless(capacities.shape == (segments,), lambda: f"capacities must be ({segments},)")
    _fail_unless(prefix_keys.dim() == 3 and prefix_keys.shape[0] == segments
                 and prefix_keys.shape[2] == key_buf.shape[1] and prefix_values.shape[:2] == prefix_keys.shape[:2]
                 and prefix_values.shape[2] == value_buf.shape[1],
                 lambda: f"prefix_keys/prefix_values must be ({segments}, P, D), got {tuple(prefix_keys.shape)} / "
                         f"{tuple(prefix_values.shape)}")
    _fail_unless(0 <= prefix_keys.shape[1] <= prefix_rows,
                 lambda: f"{prefix_keys.shape[1]} prefix entries do not fit in prefix_rows={prefix_rows}")
    _check_one_device(key_buf, value_buf, starts, lengths, capacities, prefix_keys, prefix_values)
    _torch_backend(backend, key_buf)
    return ref.prefix_segments_ref(key_buf, value_buf, starts, lengths, capacities, prefix_keys, prefix_values,
                                   prefix_rows)


def decode_attention(queries, key_buf, value_buf, starts, lengths, scale: float, block_keys=None, block_values=None,
                     *, backend: Backend | str = Backend.AUTO):
    """Per-segment attention over the segment's entries and, optionally, a dense block ``(S, P, D)`` of its own:
    ``out (S, M, Dv)`` float32 (no log-sum-exp); see :func:`reference.decode_attention_ref`.

    Torch backend: one softmax per segment (over concatenated logits when there is a block). Triton backend: the
    Triton :func:`varlen_attention` over the segments, the block in torch, merged by log-sum-exp (no host read-back).
    """
    # Without a block (every steady decoding step): the checks of _check_decode_attention in one expression.
    shape, q_shape, rows, on_cuda = starts.shape, queries.shape, key_buf.shape, queries.is_cuda
    if not (block_keys is None and block_values is None and len(shape) == 1 and lengths.shape == shape
            and starts.dtype == torch.int64 and lengths.dtype == torch.int64 and len(q_shape) == 3
            and q_shape[0] == shape[0] and len(rows) == 2 and value_buf.dim() == 2 and value_buf.shape[0] == rows[0]
            and q_shape[2] == rows[1] and queries.is_floating_point() and key_buf.is_floating_point()
            and key_buf.is_cuda == on_cuda and value_buf.is_cuda == on_cuda and starts.is_cuda == on_cuda
            and lengths.is_cuda == on_cuda):
        _check_decode_attention(queries, key_buf, value_buf, starts, lengths, block_keys, block_values)
    if _torch_backend(backend, queries):
        return ref.decode_attention_ref(queries, key_buf, value_buf, starts, lengths, scale, block_keys, block_values)
    out, lse = _triton_ops(queries).varlen_attention(queries, key_buf, value_buf, starts, lengths, scale)
    if block_keys is None:
        return out.float()
    out_b, lse_b = ref.block_attention_lse(queries, block_keys, block_values, scale)
    return ref.merge_attention(out.float(), lse.float(), out_b, lse_b)[0]


def _check_decode_attention(queries, key_buf, value_buf, starts, lengths, block_keys, block_values) -> None:
    segments = _check_segments(starts, lengths)
    _fail_unless(queries.dim() == 3 and queries.shape[0] == segments,
                 lambda: f"queries must be ({segments}, M, D), got {tuple(queries.shape)}")
    _fail_unless(key_buf.dim() == 2 and value_buf.dim() == 2 and value_buf.shape[0] == key_buf.shape[0],
                 lambda: f"key_buf/value_buf must be (capacity, D) with equal rows, got {tuple(key_buf.shape)} / "
                         f"{tuple(value_buf.shape)}")
    _fail_unless(queries.shape[2] == key_buf.shape[1],
                 lambda: f"query head_dim {queries.shape[2]} differs from key head_dim {key_buf.shape[1]}")
    _fail_unless(queries.is_floating_point() and key_buf.is_floating_point(), lambda: "queries/keys must be float")
    _fail_unless((block_keys is None) == (block_values is None), lambda: "give both block_keys and block_values")
    if block_keys is None:
        _check_one_device(queries, key_buf, value_buf, starts, lengths)
    else:
        _fail_unless(block_keys.dim() == 3 and block_keys.shape[0] == segments
                     and block_keys.shape[2] == key_buf.shape[1],
                     lambda: f"block_keys must be ({segments}, P, {key_buf.shape[1]}), got {tuple(block_keys.shape)}")
        _fail_unless(block_values.dim() == 3 and block_values.shape[:2] == block_keys.shape[:2]
                     and block_values.shape[2] == value_buf.shape[1],
                     lambda: f"block_values must be ({segments}, {block_keys.shape[1]}, {value_buf.shape[1]}), got "
                             f"{tuple(block_values.shape)}")
        _check_one_device(queries, key_buf, value_buf, starts, lengths, block_keys, block_values)
