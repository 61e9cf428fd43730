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
