"""KVzip+ scoring passes (``attention_lse``, ``max_attention``, ``causal_attention_lse``).

Three layers of checks on deliberately odd sizes: the chunked torch references against a dense float64
restatement (the whole ``(L, S)`` logit matrix), the Triton kernels against the references (through the
interpreter on CPU, ``TRITON_INTERPRET=1``), and the dispatcher's validation. Causal edges: queries at
position 0 (square block), keys after some queries (a key range across the diagonal) and keys after every
query (no query sees them: ``-inf``).
"""

from __future__ import annotations

import pytest
import torch

from kvpolicy import kernels
from kvpolicy.kernels import reference as ref

# (batch, q_heads, kv_heads, L, S, query_start): GQA groups 1, 2, 3, 4; odd lengths; square and offset blocks.
SHAPES = [
    pytest.param(1, 4, 2, 7, 20, 13, id="B1-G2-L7-S20"),
    pytest.param(2, 6, 2, 33, 33, 0, id="B2-G3-L33-square"),
    pytest.param(1, 4, 1, 70, 90, 20, id="B1-G4-L70-S90"),
    pytest.param(1, 3, 3, 17, 80, 41, id="B1-G1-L17-keys-after-queries"),
]
DIMS = [pytest.param(d, id=f"D{d}") for d in (32, 64, 128)]


def dense(queries, keys, scale, query_start):
    """``(logits (B, Hq, L, S) float64 with -inf where causal-hidden, lse (B, Hq, L) float64)``."""
    group = queries.shape[1] // keys.shape[1]
    logits = queries.double() @ keys.double().repeat_interleave(group, dim=1).transpose(-1, -2) * scale
    length, total = queries.shape[2], keys.shape[2]
    hidden = torch.arange(total)[None, :] > (query_start + torch.arange(length))[:, None]
    logits = logits.masked_fill(hidden, float("-inf"))
    return logits, logits.logsumexp(dim=-1)


def make(batch, q_heads, kv_heads, length, total, dim, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, q_heads, length, dim, generator=g) * 1.5).to(dtype)
    k = (torch.randn(batch, kv_heads, total, dim, generator=g) * 1.5).to(dtype)
    v = torch.randn(batch, kv_heads, total, dim, generator=g).to(dtype)
    bias = torch.randn(batch, length, generator=g)
    return q, k, v, bias


def key_ranges(total, query_start):
    """All keys; a range ending just past the first query (across the diagonal); a tiny one at the end."""
    return [(0, total), (max(0, query_start - 3), min(total, query_start + 5)), (total - 1, total)]


def assert_log_close(actual, expected, atol=2e-5):
    """float32 log statistics vs float64: equal -inf pattern, finite entries within ``atol``."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert not actual.isnan().any(), "NaN: an unwritten element"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual.double()[finite], expected[finite], atol=atol, rtol=0)


# ------------------------------------------------------------------------------ torch references vs dense


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize(("batch", "q_heads", "kv_heads", "length", "total", "query_start"), SHAPES)
def test_references_match_dense(batch, q_heads, kv_heads, length, total, query_start, dim, monkeypatch):
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 300)  # many chunks, so chunk edges are exercised
    q, k, _, bias = make(batch, q_heads, kv_heads, length, total, dim, seed=length * 7 + dim)
    scale = dim ** -0.5
    logits, lse = dense(q, k, scale, query_start)
    assert_log_close(ref.attention_lse_ref(q, k, scale, query_start), lse)
    for key_start, key_end in key_ranges(total, query_start):
        out = ref.max_attention_ref(q, k, lse.float(), scale, query_start, key_start, key_end, bias)
        expected = (logits - lse[..., None] + bias.double()[:, None, :, None])[..., key_start:key_end].amax(dim=2)
        assert_log_close(out, expected)


def test_keys_no_query_sees_are_minus_inf():
    q, k, _, _ = make(1, 2, 1, 5, 30, 32, seed=0)
    lse = ref.attention_lse_ref(q, k, 0.2, 10)
    out = kernels.max_attention(q, k, lse, 0.2, query_start=10, key_start=12, key_end=30)
    # query t sees keys <= 10 + t: key 12 is seen by t >= 2, keys >= 15 by nobody
    assert torch.isfinite(out[..., :3]).all() and torch.isneginf(out[..., 3:]).all()


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("total", [1, 29, 64], ids=lambda t: f"S{t}")
def test_causal_attention_paths_match_dense(dim, total, monkeypatch):
    """Fused CPU path (two flash calls merged) and chunked reference against a dense softmax."""
    length = min(total, 11)
    q, k, v, _ = make(2, 4, 2, length, total, dim, seed=total + dim)
    scale = dim ** -0.5
    logits, lse = dense(q, k, scale, total - length)
    out_dense = torch.softmax(logits, dim=-1) @ v.double().repeat_interleave(2, dim=1)
    fused = ref.causal_attention_lse_fused(q, k, v, scale)
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 200)
    chunked = ref.causal_attention_lse_ref(q, k, v, scale, total - length)
    for name, result in (("fused", fused), ("chunked", chunked)):
        if result is None:  # a torch without the fused CPU op
            assert name == "fused"
            continue
        out, got_lse = result
        torch.testing.assert_close(out.double(), out_dense, atol=2e-5, rtol=0, msg=name)
        assert_log_close(got_lse, lse)
    out, got_lse = kernels.causal_attention_lse(q, k, v, scale)
    torch.testing.assert_close(out.double(), out_dense, atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- Triton kernels vs references

triton_cases = pytest.mark.parametrize(("batch", "q_heads", "kv_heads", "length", "total", "query_start"), SHAPES)


@pytest.mark.parametrize("dim", DIMS)
@triton_cases
def test_triton_attention_lse_matches_reference(device, poisoned_empty, batch, q_heads, kv_heads, length, total,
                                                query_start, dim):
    triton_ops = pytest.importorskip("kvpolicy.kernels.triton_ops")
    q, k, _, _ = make(batch, q_heads, kv_heads, length, total, dim, seed=3 * length + dim)
    expected = ref.attention_lse_ref(q, k, dim ** -0.5, query_start)
    got = triton_ops.attention_lse(q.to(device), k.to(device), dim ** -0.5, query_start).cpu()
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dim", DIMS)
@triton_cases
def test_triton_max_attention_matches_reference(device, poisoned_empty, batch, q_heads, kv_heads, length, total,
                                                query_start, dim):
    triton_ops = pytest.importorskip("kvpolicy.kernels.triton_ops")
    q, k, _, bias = make(batch, q_heads, kv_heads, length, total, dim, seed=5 * length + dim)
    scale = dim ** -0.5
    lse = ref.attention_lse_ref(q, k, scale, query_start)
    for key_start, key_end in key_ranges(total, query_start):
        expected = ref.max_attention_ref(q, k, lse, scale, query_start, key_start, key_end, bias)
        got = triton_ops.max_attention(q.to(device), k.to(device), lse.to(device), scale, query_start, key_start,
                                       key_end, bias.to(device)).cpu()
        assert not got.isnan().any(), (key_start, key_end)
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), (key_start, key_end)
        finite = torch.isfinite(expected)
        torch.testing.assert_close(got[finite], expected[finite], atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_triton_half_inputs_accumulate_in_float32(device, dtype):
    """Half-precision queries/keys are read as they are and accumulated in float32, like the reference on
    the same (rounded) inputs; strided (non-contiguous) queries are fine as long as head_dim is unit-stride."""
    triton_ops = pytest.importorskip("kvpolicy.kernels.triton_ops")
    q, k, _, bias = make(1, 4, 2, 19, 45, 64, seed=11, dtype=dtype)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, Hq, D) storage, as transformers makes it
    scale = 0.125
    lse_ref = ref.attention_lse_ref(q, k, scale, 26)
    lse = triton_ops.attention_lse(q.to(device), k.to(device), scale, 26).cpu()
    torch.testing.assert_close(lse, lse_ref, atol=1e-4, rtol=0)
    got = triton_ops.max_attention(q.to(device), k.to(device), lse_ref.to(device), scale, 26, 0, 45,
                                   bias.to(device)).cpu()
    expected = ref.max_attention_ref(q, k, lse_ref, scale, 26, 0, 45, bias)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_dispatch_triton_backend_matches_torch(device):
    """The public ops with backend="triton" (interpreted on CPU) agree with backend="torch"."""
    pytest.importorskip("kvpolicy.kernels.triton_ops")
    q, k, v, bias = make(1, 4, 2, 9, 30, 32, seed=2)
    q, k, v, bias = (t.to(device) for t in (q, k, v, bias))
    out = {}
    for backend in ("torch", "triton"):
        lse = kernels.attention_lse(q, k, 0.2, query_start=21, backend=backend)
        best = kernels.max_attention(q, k, lse, 0.2, query_start=21, key_start=3, key_end=25, query_bias=bias,
                                     backend=backend)
        attn, attn_lse = kernels.causal_attention_lse(q, k, v, 0.2, backend=backend)
        out[backend] = (lse, best, attn, attn_lse)
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(a.cpu(), b.cpu(), atol=2e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(("op", "kwargs", "message"), [
    ("attention_lse", {"queries": torch.randn(1, 3, 4, 8)}, "multiple of kv heads"),
    ("attention_lse", {"keys": torch.randn(1, 2, 9, 6)}, "head_dim"),
    ("attention_lse", {"query_start": -1}, "query_start"),
    ("attention_lse", {"queries": torch.randn(4, 8)}, "queries must be"),
    ("max_attention", {"lse": torch.zeros(1, 4, 5)}, "lse must be"),
    ("max_attention", {"key_end": 10}, "key range"),
    ("max_attention", {"key_start": 6, "key_end": 5}, "key range"),
    ("max_attention", {"query_bias": torch.zeros(1, 3)}, "query_bias"),
    ("causal_attention_lse", {"queries": torch.randn(1, 4, 12, 8)}, "last"),
    ("causal_attention_lse", {"values": torch.randn(1, 2, 8, 8)}, "values"),
])
def test_invalid_inputs_are_value_errors(op, kwargs, message):
    args = {"queries": torch.randn(1, 4, 4, 8), "keys": torch.randn(1, 2, 9, 8), "scale": 0.3}
    if op == "attention_lse":
        args["query_start"] = 5
    elif op == "max_attention":
        args.update(lse=torch.zeros(1, 4, 4), query_start=5)
    else:
        args["values"] = torch.randn(1, 2, 9, 8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        getattr(kernels, op)(**args)
