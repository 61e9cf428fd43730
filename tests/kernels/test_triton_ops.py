"""Every Triton kernel against its torch reference, on deliberately odd sizes.

Gather/scatter/index ops must match exactly; attention to float tolerance. On CPU the kernels run through
the Triton interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``), which is slow: sizes and
hypothesis example counts are kept small on purpose.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpolicy.kernels import reference as ref

triton_ops = pytest.importorskip("kvpolicy.kernels.triton_ops")

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float16, torch.bfloat16)]
DIMS = [pytest.param(d, id=f"D{d}") for d in (60, 64, 128)]


# compact_heads: random masks on every (dtype, T, D); all/none masks on one dtype and D, every T.
COMPACT_HEADS_CASES = [
    pytest.param(dtype, t, d, "random", id=f"{str(dtype).removeprefix('torch.')}-T{t}-D{d}-random")
    for dtype in (torch.float32, torch.float16, torch.bfloat16) for t in (1, 63, 129) for d in (60, 64, 128)
] + [
    pytest.param(torch.bfloat16, t, 60, kind, id=f"bfloat16-T{t}-D60-{kind}")
    for t in (1, 63, 129) for kind in ("all", "none")
]

# varlen_attention: group M=5 on every (dtype, D); other group sizes in fp32 only.
ATTENTION_CASES = [
    pytest.param(dtype, d, 5, id=f"{str(dtype).removeprefix('torch.')}-D{d}-M5")
    for dtype in (torch.float32, torch.float16, torch.bfloat16) for d in (60, 64, 128)
] + [pytest.param(torch.float32, d, m, id=f"float32-D{d}-M{m}") for d in (60, 64, 128) for m in (1, 17)]

# Hypothesis runs each example through the interpreter; a fixture per test function is fine here because
# the fixtures are stateless (device string, monkeypatched allocators).
HYPOTHESIS = settings(max_examples=12, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def make_mask(kind: str, shape, generator: torch.Generator) -> torch.Tensor:
    if kind == "all":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(shape, dtype=torch.bool)
    return torch.rand(shape, generator=generator) < 0.5


@st.composite
def run_masks(draw, numel: int) -> torch.Tensor:
    """Flat bool masks built from alternating runs, so tile boundaries meet every kind of pattern."""
    value = draw(st.booleans())
    runs = draw(st.lists(st.integers(1, 80), min_size=1, max_size=12))
    bits: list[bool] = []
    for run in runs:
        bits += [value] * run
        value = not value
    bits = (bits * (numel // len(bits) + 1))[:numel]
    return torch.tensor(bits, dtype=torch.bool)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact equality, including dtype, shape and NaN positions (a NaN means an unwritten element)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, actual.shape,
                                                                            expected.dtype, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=False)


# ------------------------------------------------------------------------------------------ compact_heads


@pytest.mark.parametrize(("dtype", "tokens", "dim", "mask_kind"), COMPACT_HEADS_CASES)
def test_compact_heads_matches_reference(device, poisoned_empty, dtype, tokens, dim, mask_kind):
    g = torch.Generator().manual_seed(tokens * 1000 + dim)
    keys = torch.randn(2, 3, tokens, dim, generator=g).to(dtype)
    values = torch.randn(2, 3, tokens, dim, generator=g).to(dtype)
    keep = make_mask(mask_kind, (2, 3, tokens), g)
    expected = ref.compact_heads_ref(keys, values, keep)
    actual = triton_ops.compact_heads(keys.to(device), values.to(device), keep.to(device))
    for a, e in zip(actual, expected):
        assert_same(a.cpu(), e)


def test_compact_heads_strided_input(device, poisoned_empty):
    """Non-contiguous (B, H, T) strides are read directly, e.g. keys transposed from (B, T, H, D)."""
    g = torch.Generator().manual_seed(7)
    keys = torch.randn(2, 129, 3, 60, generator=g).transpose(1, 2)
    values = torch.randn(2, 129, 3, 60, generator=g).transpose(1, 2)
    keep = torch.rand(2, 129, 3, generator=g).transpose(1, 2) < 0.3
    expected = ref.compact_heads_ref(keys, values, keep)
    actual = triton_ops.compact_heads(keys.to(device), values.to(device), keep.to(device))
    for a, e in zip(actual, expected):
        assert_same(a.cpu(), e)


@HYPOTHESIS
@given(data=st.data(), batch=st.integers(1, 2), heads=st.integers(1, 3), tokens=st.sampled_from([1, 63, 64, 129]))
def test_compact_heads_mask_patterns(device, poisoned_empty, data, batch, heads, tokens):
    keep = data.draw(run_masks(batch * heads * tokens)).reshape(batch, heads, tokens)
    keys = torch.randn(batch, heads, tokens, 60).half()
    values = torch.randn(batch, heads, tokens, 60).half()
    expected = ref.compact_heads_ref(keys, values, keep)
    actual = triton_ops.compact_heads(keys.to(device), values.to(device), keep.to(device))
    for a, e in zip(actual, expected):
        assert_same(a.cpu(), e)


@pytest.mark.parametrize("shape", [(0, 2, 5, 4), (1, 2, 0, 4), (1, 2, 5, 0), (2, 0, 3, 4)],
                         ids=["no-batch", "no-tokens", "no-head-dim", "no-heads"])
def test_compact_heads_degenerate_shapes(device, poisoned_empty, shape):
    keys = torch.randn(shape)
    keep = torch.rand(shape[:3]) < 0.5
    expected = ref.compact_heads_ref(keys, keys, keep)
    actual = triton_ops.compact_heads(keys.to(device), keys.to(device), keep.to(device))
    for a, e in zip(actual, expected):
        assert_same(a.cpu(), e)


@pytest.mark.parametrize("slack", [0, 5], ids=["exact", "spare"])
def test_compact_heads_into_caller_buffer(device, slack):
    """Rows past N stay as they were (NaN here); no host sync needed to size anything."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 4, 63, 64, generator=g).bfloat16()
    values = torch.randn(1, 4, 63, 64, generator=g).bfloat16()
    keep = torch.rand(1, 4, 63, generator=g) < 0.5
    exp_k, exp_v, exp_cu = ref.compact_heads_ref(keys, values, keep)
    n = exp_k.shape[0]
    out_k = torch.full((n + slack, 64), float("nan"), dtype=torch.bfloat16, device=device)
    out_v = torch.full_like(out_k, float("nan"))
    cu = triton_ops.compact_heads_into(keys.to(device), values.to(device), keep.to(device), out_k, out_v)
    assert_same(cu.cpu(), exp_cu)
    assert_same(out_k[:n].cpu(), exp_k)
    assert_same(out_v[:n].cpu(), exp_v)
    assert bool(out_k[n:].isnan().all()) and bool(out_v[n:].isnan().all())


def test_compact_heads_into_too_small_never_overruns(device):
    keys = torch.randn(1, 2, 63, 60)
    keep = torch.ones(1, 2, 63, dtype=torch.bool)
    storage = torch.full((130, 60), float("nan"), device=device)
    out_k, out_v = storage[:100], torch.full((100, 60), float("nan"), device=device)
    cu = triton_ops.compact_heads_into(keys.to(device), keys.to(device), keep.to(device), out_k, out_v)
    assert int(cu[-1]) == 126  # the caller sees that 126 > 100 rows were needed
    assert_same(out_k.cpu(), keys.reshape(-1, 60)[:100])
    assert bool(storage[100:].isnan().all())


# ------------------------------------------------------------------------------------------------ append


def _segment_layout(lengths: list[int], spare: list[int], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Starts for segments laid out in reverse order with gaps, so nothing relies on sorted starts."""
    starts, row = [0] * len(lengths), 3
    for s in reversed(range(len(lengths))):
        starts[s] = row
        row += lengths[s] + spare[s] + 2
    return (torch.tensor(starts, dtype=torch.int64, device=device),
            torch.tensor(lengths, dtype=torch.int64, device=device), row)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_append_matches_reference(device, dtype, dim):
    g = torch.Generator().manual_seed(dim)
    lengths = [0, 1, 63, 5, 129, 2, 0]
    starts, lens, capacity = _segment_layout(lengths, [1] * len(lengths), "cpu")
    key_buf = torch.full((capacity, dim), float("nan")).to(dtype)
    value_buf = torch.full((capacity, dim), float("nan")).to(dtype)
    key_buf[: capacity // 2] = torch.randn(capacity // 2, dim, generator=g).to(dtype)
    new_k = torch.randn(len(lengths), dim, generator=g).to(dtype)
    new_v = torch.randn(len(lengths), dim, generator=g).to(dtype)
    mask = torch.tensor([True, False, True, True, True, False, True])

    exp = [key_buf.clone(), value_buf.clone(), lens.clone()]
    ref.append_ref(exp[0], exp[1], starts, exp[2], new_k, new_v, mask)
    got = [key_buf.to(device), value_buf.to(device), lens.to(device)]
    triton_ops.append(got[0], got[1], starts.to(device), got[2], new_k.to(device), new_v.to(device), mask.to(device))
    for a, e in zip(got, exp):
        torch.testing.assert_close(a.cpu(), e, rtol=0, atol=0, equal_nan=True)


@HYPOTHESIS
@given(bits=st.lists(st.booleans(), min_size=6, max_size=6), int32=st.booleans())
def test_append_mask_patterns(device, bits, int32):
    index_dtype = torch.int32 if int32 else torch.int64
    starts = torch.tensor([0, 10, 20, 30, 40, 50], dtype=index_dtype)
    lens = torch.tensor([0, 9, 3, 1, 0, 7], dtype=index_dtype)
    key_buf = torch.randn(60, 60)
    new_k = torch.randn(6, 60)
    mask = torch.tensor(bits)
    exp_k, exp_len = key_buf.clone(), lens.clone()
    ref.append_ref(exp_k, exp_k.clone(), starts, exp_len, new_k, new_k, mask)
    got_k, got_v, got_len = key_buf.to(device), key_buf.to(device), lens.to(device)
    triton_ops.append(got_k, got_v, starts.to(device), got_len, new_k.to(device), new_k.to(device), mask.to(device))
    assert_same(got_k.cpu(), exp_k)
    assert_same(got_v.cpu(), exp_k)
    assert_same(got_len.cpu(), exp_len)


# ------------------------------------------------------------------------------------------------ regrow


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_regrow_matches_reference(device, poisoned_empty, dtype, dim):
    g = torch.Generator().manual_seed(dim + 1)
    lengths = [0, 1, 63, 129, 2]
    starts, lens, capacity = _segment_layout(lengths, [0, 3, 1, 0, 9], "cpu")
    key_buf = torch.randn(capacity, dim, generator=g).to(dtype)
    value_buf = torch.randn(capacity, dim, generator=g).to(dtype)
    new_caps = lens + torch.tensor([0, 70, 1, 0, 130])
    expected = ref.regrow_ref(key_buf, value_buf, starts, lens, new_caps)
    actual = triton_ops.regrow(key_buf.to(device), value_buf.to(device), starts.to(device), lens.to(device),
                               new_caps.to(device))
    for a, e in zip(actual, expected):
        assert_same(a.cpu(), e)


@HYPOTHESIS
@given(lengths=st.lists(st.integers(0, 70), min_size=1, max_size=6), data=st.data())
def test_regrow_capacity_patterns(device, poisoned_empty, lengths, data):
    extra = data.draw(st.lists(st.integers(0, 70), min_size=len(lengths), max_size=len(lengths)))
    starts, lens, capacity = _segment_layout(lengths, [0] * len(lengths), "cpu")
    key_buf = torch.randn(capacity, 64).bfloat16()
    new_caps = lens + torch.tensor(extra)
    expected = ref.regrow_ref(key_buf, key_buf, starts, lens, new_caps)
    actual = triton_ops.regrow(key_buf.to(device), key_buf.to(device), starts.to(device), lens.to(device),
                               new_caps.to(device))
    for a, e in zip(actual, expected):
        assert_same(a.cpu(), e)


# --------------------------------------------------------------------------------------- varlen_attention


@pytest.mark.parametrize(("dtype", "dim", "group"), ATTENTION_CASES)
def test_varlen_attention_matches_reference(device, poisoned_empty, dtype, dim, group):
    g = torch.Generator().manual_seed(dim * 7 + group)
    lengths = [0, 1, 63, 129, 64]  # empty, single, odd, two-and-a-bit tiles, exactly one tile
    starts, lens, capacity = _segment_layout(lengths, [2] * len(lengths), "cpu")
    key_buf = (torch.randn(capacity, dim, generator=g) * 2).to(dtype)
    value_buf = torch.randn(capacity, dim, generator=g).to(dtype)
    queries = torch.randn(len(lengths), group, dim, generator=g).to(dtype)
    scale = 1 / math.sqrt(dim)
    exp_out, exp_lse = ref.varlen_attention_ref(queries, key_buf, value_buf, starts, lens, scale)
    out, lse = triton_ops.varlen_attention(queries.to(device), key_buf.to(device), value_buf.to(device),
                                           starts.to(device), lens.to(device), scale)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    # Both sides compute in float32 from the same inputs; only the summation order differs.
    torch.testing.assert_close(out.cpu(), exp_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu(), exp_lse, rtol=1e-5, atol=1e-5)
    assert bool((out[0] == 0).all()) and bool(torch.isneginf(lse[0]).all())


def test_varlen_attention_value_dim_differs(device, poisoned_empty):
    g = torch.Generator().manual_seed(11)
    starts = torch.tensor([0, 40], dtype=torch.int64)
    lens = torch.tensor([37, 70], dtype=torch.int64)
    key_buf = torch.randn(110, 60, generator=g)
    value_buf = torch.randn(110, 48, generator=g)
    queries = torch.randn(2, 3, 60, generator=g)
    expected = ref.varlen_attention_ref(queries, key_buf, value_buf, starts, lens, 0.2)
    actual = triton_ops.varlen_attention(queries.to(device), key_buf.to(device), value_buf.to(device),
                                         starts.to(device), lens.to(device), 0.2)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-5, atol=1e-5)


def test_varlen_attention_large_logits_stay_finite(device):
    """Online softmax must rescale: logits around 1e3 would overflow a naive exp."""
    starts = torch.tensor([0], dtype=torch.int64)
    lens = torch.tensor([129], dtype=torch.int64)
    key_buf = torch.randn(129, 64) * 30
    queries = torch.randn(1, 2, 64) * 30
    value_buf = torch.randn(129, 64)
    exp_out, exp_lse = ref.varlen_attention_ref(queries, key_buf, value_buf, starts, lens, 1.0)
    out, lse = triton_ops.varlen_attention(queries.to(device), key_buf.to(device), value_buf.to(device),
                                           starts.to(device), lens.to(device), 1.0)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out.cpu(), exp_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.cpu(), exp_lse, rtol=1e-5, atol=1e-2)


# ------------------------------------------------------------------------------------- wrapper validation


def test_wrappers_reject_bad_layout_before_launch():
    keys = torch.randn(1, 2, 8, 64)
    keep = torch.ones(1, 2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="unit stride along head_dim"):
        triton_ops.compact_heads(keys[..., ::2], keys[..., ::2], keep)
    with pytest.raises(ValueError, match="out_keys must be"):
        triton_ops.compact_heads_into(keys, keys, keep, torch.empty(16, 64).half(), torch.empty(16, 64).half())
    with pytest.raises(ValueError, match="starts must be int32 or int64"):
        triton_ops.append(torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(2), torch.zeros(2, dtype=torch.int64),
                          torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="lengths must be contiguous"):
        triton_ops.regrow(torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(2, dtype=torch.int64),
                          torch.zeros(4, dtype=torch.int64)[::2], torch.ones(2, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_compact_heads_benchmark_size_on_gpu():
    """The benchmark's shape (32k tokens x 8 KV heads x 128 dims, bf16), compiled for real (run with
    ``TRITON_INTERPRET=0``; under the interpreter it is merely slow)."""
    keys = torch.randn(1, 8, 32768, 128, device="cuda").bfloat16()
    values = torch.randn(1, 8, 32768, 128, device="cuda").bfloat16()
    keep = torch.rand(1, 8, 32768, device="cuda") < 0.5
    for a, e in zip(triton_ops.compact_heads(keys, values, keep), ref.compact_heads_ref(keys, values, keep)):
        assert_same(a, e)
