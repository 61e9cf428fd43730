"""The backend dispatcher: backend choice, input validation, and the Triton path through it on CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kvpolicy import kernels
from kvpolicy.kernels import Backend, resolve_backend
from kvpolicy.ragged import RaggedStore

from .conftest import INTERPRETED

needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU needs TRITON_INTERPRET=1")


def i64(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_auto_picks_torch_on_cpu():
    assert resolve_backend("auto", torch.zeros(2)) is Backend.TORCH
    assert resolve_backend(Backend.TRITON, torch.zeros(2)) is Backend.TRITON


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="cuda"):
        resolve_backend("cuda", torch.zeros(2))


def test_cpu_ops_never_import_triton():
    """Only an explicit Triton backend (or CUDA tensors) may pull in triton."""
    code = (
        "import sys, torch, kvpolicy, kvpolicy.kernels as k\n"
        "x = torch.randn(1, 2, 5, 4); m = torch.rand(1, 2, 5) < 0.5\n"
        "kb, vb, cu = k.compact_heads(x, x, m)\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.compact_heads(x, x, torch.ones(1, 1, 3, dtype=torch.bool), backend="triton")


# Each case: (op, kwargs builder, message the ValueError must contain). Validation runs before any backend.
def _compact_heads_args(**override):
    args = dict(keys=torch.randn(1, 2, 3, 4), values=torch.randn(1, 2, 3, 4),
                keep_mask=torch.ones(1, 2, 3, dtype=torch.bool))
    return {**args, **override}


def _append_args(**override):
    args = dict(key_buf=torch.zeros(8, 4), value_buf=torch.zeros(8, 4), starts=i64(0, 4), lengths=i64(1, 2),
                new_keys=torch.ones(2, 4), new_values=torch.ones(2, 4), append_mask=torch.tensor([True, False]))
    return {**args, **override}


def _regrow_args(**override):
    args = dict(key_buf=torch.zeros(8, 4), value_buf=torch.zeros(8, 4), starts=i64(0, 4), lengths=i64(1, 2),
                new_capacities=i64(4, 4))
    return {**args, **override}


def _attention_args(**override):
    args = dict(queries=torch.randn(2, 3, 4), key_buf=torch.randn(8, 4), value_buf=torch.randn(8, 4),
                starts=i64(0, 4), lengths=i64(1, 2), scale=0.5)
    return {**args, **override}


BAD_INPUTS = [
    pytest.param(kernels.compact_heads, _compact_heads_args(keys=torch.randn(2, 3, 4)), "keys must be",
                 id="compact_heads-3d-keys"),
    pytest.param(kernels.compact_heads, _compact_heads_args(keep_mask=torch.ones(1, 2, 3)), "keep_mask must be bool",
                 id="compact_heads-float-mask"),
    pytest.param(kernels.compact_heads, _compact_heads_args(values=torch.randn(1, 2, 3, 4).half()), "dtypes differ",
                 id="compact_heads-dtype-mismatch"),
    pytest.param(kernels.append, _append_args(starts=torch.zeros(2)), "starts must be an integer",
                 id="append-float-starts"),
    pytest.param(kernels.append, _append_args(new_keys=torch.ones(3, 4)), "new_keys must be",
                 id="append-wrong-rows"),
    pytest.param(kernels.append, _append_args(new_keys=torch.ones(2, 4).half()), "must match the buffers' dtype",
                 id="append-dtype-mismatch"),
    pytest.param(kernels.append, _append_args(append_mask=torch.ones(2)), "append_mask must be bool",
                 id="append-float-mask"),
    pytest.param(kernels.regrow, _regrow_args(new_capacities=i64(0, 4)), "new_capacities must be >= lengths",
                 id="regrow-capacity-too-small"),
    pytest.param(kernels.regrow, _regrow_args(new_capacities=i64(4, 4, 4)), "new_capacities must be (2,)",
                 id="regrow-wrong-count"),
    pytest.param(kernels.varlen_attention, _attention_args(queries=torch.randn(3, 3, 4)), "queries must be (2, M, D)",
                 id="attention-wrong-segments"),
    pytest.param(kernels.varlen_attention, _attention_args(key_buf=torch.randn(8, 5)), "head_dim",
                 id="attention-head-dim-mismatch"),
    pytest.param(kernels.varlen_attention, _attention_args(lengths=torch.ones(2)), "lengths must be an integer",
                 id="attention-float-lengths"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("op", "args", "message"), BAD_INPUTS)
def test_validation_names_the_problem(op, args, message, backend):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        op(**args, backend=backend)


@needs_interpreter
def test_triton_backend_on_cpu_matches_torch():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 63, 60, generator=g), torch.randn(2, 2, 63, 60, generator=g)
    keep = torch.rand(2, 2, 63, generator=g) < 0.4
    for a, b in zip(kernels.compact_heads(keys, values, keep, backend="triton"),
                    kernels.compact_heads(keys, values, keep, backend="torch")):
        assert torch.equal(a, b)

    buf = torch.randn(300, 60, generator=g)
    starts, lengths, caps = i64(0, 70, 140, 210), i64(63, 0, 1, 9), i64(80, 70, 5, 90)
    for a, b in zip(kernels.regrow(buf, buf, starts, lengths, caps, backend="triton"),
                    kernels.regrow(buf, buf, starts, lengths, caps, backend="torch")):
        assert torch.equal(a, b)

    queries = torch.randn(4, 3, 60, generator=g)
    out_t, lse_t = kernels.varlen_attention(queries, buf, buf, starts, lengths, 0.1, backend="triton")
    out_r, lse_r = kernels.varlen_attention(queries, buf, buf, starts, lengths, 0.1, backend="torch")
    torch.testing.assert_close(out_t, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_t, lse_r, rtol=1e-5, atol=1e-5)

    bufs = [buf.clone() for _ in range(4)]
    lens = [lengths.clone(), lengths.clone()]
    new = torch.randn(4, 60, generator=g)
    mask = torch.tensor([True, True, False, True])
    kernels.append(bufs[0], bufs[1], starts, lens[0], new, new, mask, backend="triton")
    kernels.append(bufs[2], bufs[3], starts, lens[1], new, new, mask, backend="torch")
    assert torch.equal(bufs[0], bufs[2]) and torch.equal(bufs[1], bufs[3]) and torch.equal(lens[0], lens[1])


@needs_interpreter
def test_ragged_store_same_on_both_backends():
    """RaggedStore's prefill, block extend (with regrow) and decode appends agree across backends."""
    g = torch.Generator().manual_seed(5)
    stores = {b: RaggedStore.empty(6, 60, torch.bfloat16, "cpu", backend=b) for b in ("torch", "triton")}
    blocks = [(70, 0.5), (1, 0.7), (1, 0.7), (20, 0.3), (1, 1.0)]
    for tokens, p in blocks:
        keys = torch.randn(2, 3, tokens, 60, generator=g).bfloat16()
        values = torch.randn(2, 3, tokens, 60, generator=g).bfloat16()
        keep = torch.rand(2, 3, tokens, generator=g) < p
        for store in stores.values():
            store.extend(keys, values, keep)
    a, b = stores["triton"], stores["torch"]
    assert torch.equal(a.lengths, b.lengths)
    for s in range(a.segments):
        for x, y in zip(a.segment(s), b.segment(s)):
            assert torch.equal(x, y)
    queries = torch.randn(6, 4, 60, generator=g).bfloat16()
    for x, y in zip(a.attention(queries, 0.125), b.attention(queries, 0.125)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
