"""Head-row attention (``kvpolicy.adapters.sglang.row_kernels``): Triton against the torch references, and the
references against dense masked SDPA.

Pools here are built the way a long-running server leaves them: rows scattered at random over the row buffers,
about a third of the entries absent (row 0), the dummy row and every unused row filled with NaN, and
``req_to_token`` past each request's length filled with slot ids far outside the index. None of that may reach
an output. On CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py``; the ``device`` fixture skips CPU without it), so sizes stay small. No SGLang import.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from kvpolicy.adapters.sglang import row_kernels as rk
from kvpolicy.adapters.sglang.head_rows import head_row_attention

pytest.importorskip("triton")

GARBAGE_SLOT = 2**30  # what req_to_token holds past a request's length here: far outside row_of

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (group, head_dim) for every comparison; D = 64 and 128 as served, GQA groups 1, 4, 8.
SHAPES = [pytest.param(g, d, id=f"G{g}-D{d}") for g in (1, 4, 8) for d in (64, 128)]
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float16, torch.bfloat16)]


class Pool(NamedTuple):
    k_rows: torch.Tensor  # (R+1, D)
    v_rows: torch.Tensor  # (R+1, Dv)
    row_of: torch.Tensor  # (S+1, H) int32
    req_to_token: torch.Tensor  # (P, C) int32
    req_pool_indices: torch.Tensor  # (B,) int64
    lengths: torch.Tensor  # (B,) int64: tokens each request has in the pool

    def to(self, device) -> Pool:
        return Pool(*(t.to(device) for t in self))

    def request(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Request ``b``'s gathered ``k`` ``(T, H, D)``, ``v`` ``(T, H, Dv)`` and ``present`` ``(T, H)``."""
        slots = self.req_to_token[int(self.req_pool_indices[b]), :int(self.lengths[b])].long()
        rows = self.row_of[slots].long()
        return self.k_rows[rows], self.v_rows[rows], rows != 0


def make_pool(lengths: list[int], heads: int, dim: int, *, keep: float = 1 / 3, seed: int = 0,
              dtype: torch.dtype = torch.float32, dv: int | None = None) -> Pool:
    """A pool holding ``len(lengths)`` requests; each entry present with probability ``keep``."""
    g = torch.Generator().manual_seed(seed)
    dv = dim if dv is None else dv
    slots = sum(lengths) + 7  # a few slots no request holds
    rows = slots * heads + 11  # and rows nobody owns
    row_of = torch.zeros(slots + 1, heads, dtype=torch.int32)
    row_of[1:] = (torch.randperm(rows, generator=g)[:slots * heads] + 1).view(slots, heads).int()
    row_of[torch.rand(slots + 1, heads, generator=g) >= keep] = 0
    row_of[0] = 0
    k_rows = torch.full((rows + 1, dim), float("nan"))
    v_rows = torch.full((rows + 1, dv), float("nan"))
    owned = row_of[row_of != 0].long()
    k_rows[owned] = torch.randn(owned.numel(), dim, generator=g)
    v_rows[owned] = torch.randn(owned.numel(), dv, generator=g)
    # Request b lives in table row (B - b): not in batch order; its slots are scattered over the index.
    table = torch.full((len(lengths) + 2, max(lengths, default=0) + 5), GARBAGE_SLOT, dtype=torch.int32)
    order = torch.randperm(slots, generator=g) + 1
    indices, used = [], 0
    for b, n in enumerate(lengths):
        table[len(lengths) - b, :n] = order[used:used + n].int()
        indices.append(len(lengths) - b)
        used += n
    return Pool(k_rows.to(dtype), v_rows.to(dtype), row_of, table, torch.tensor(indices), torch.tensor(lengths))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    tol = TOLERANCE[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not bool(actual.isnan().any()), "NaN in the output"
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=tol, atol=tol)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, present: torch.Tensor,
                visible: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of ``q`` ``(M, Hq, D)`` over gathered ``k``/``v`` ``(T, H, *)`` with an explicit mask,
    as a dense backend would compute it; also which (query, head) pairs have any key ``(M, Hq)``."""
    m, heads_q, _ = q.shape
    group = heads_q // k.shape[1]
    mask = present.t().repeat_interleave(group, dim=0)[:, None, :].expand(heads_q, m, k.shape[0])  # (Hq, M, T)
    if visible is not None:
        mask = mask & visible[None]
    k = torch.where(present[..., None], k.float(), 0.0)  # SDPA's additive mask would keep a NaN key's NaN
    v = torch.where(present[..., None], v.float(), 0.0)
    out = scaled_dot_product_attention(q.float().transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None], attn_mask=mask[None], scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1), mask.any(dim=-1).t()


# ------------------------------------------------------------------------------------------------- decode


def decode_inputs(pool: Pool, group: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(pool.lengths), pool.row_of.shape[1] * group, pool.k_rows.shape[1], generator=g).to(dtype)


def run_decode(pool: Pool, q: torch.Tensor, scale: float, backend: str, device: str = "cpu", **kw):
    p = pool.to(device)
    return rk.decode_attention(q.to(device), p.k_rows, p.v_rows, p.row_of, p.req_to_token, p.req_pool_indices,
                               p.lengths, scale, backend=backend, **kw)


@pytest.mark.parametrize("lengths", [[77], [1, 63, 130]], ids=["one-request", "three-odd-lengths"])
@pytest.mark.parametrize(("group", "dim"), SHAPES)
def test_decode_matches_reference(device, poisoned_empty, group, dim, lengths):
    pool = make_pool(lengths, heads=2, dim=dim, seed=group * 100 + dim)
    q = decode_inputs(pool, group, seed=dim)
    scale = 1 / math.sqrt(dim)
    expected = run_decode(pool, q, scale, "torch")
    actual = run_decode(pool, q, scale, "triton", device, num_splits=3)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == torch.float32
    assert_close(actual[0], expected[0])
    assert_close(actual[1], expected[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_half_precision_pools(device, poisoned_empty, dtype):
    pool = make_pool([45, 100], heads=2, dim=64, seed=9, dtype=dtype)
    q = decode_inputs(pool, 4, seed=9, dtype=dtype)
    expected = run_decode(pool, q, 0.125, "torch")
    actual = run_decode(pool, q, 0.125, "triton", device, num_splits=2)
    assert_close(actual[0], expected[0], dtype)
    assert_close(actual[1], expected[1], dtype)


@pytest.mark.parametrize("splits", [1, 2, 5, 64])
def test_decode_splits_do_not_change_the_result(device, poisoned_empty, splits):
    # 64 splits of a 130-token request: most splits are empty (lse -inf) and the combine must skip them.
    pool = make_pool([130, 3], heads=2, dim=64, seed=4)
    q = decode_inputs(pool, 4, seed=4)
    expected = run_decode(pool, q, 0.125, "torch")
    actual = run_decode(pool, q, 0.125, "triton", device, num_splits=splits)
    assert_close(actual[0], expected[0])
    assert_close(actual[1], expected[1])


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_all_masked_heads_blocks_and_splits(device, poisoned_empty, splits):
    """A head with no present key anywhere; a request whose later blocks and splits hold nothing present; one
    whose first blocks hold nothing (the running max is still -inf when they are processed)."""
    pool = make_pool([90, 200, 2, 150], heads=2, dim=64, keep=0.6, seed=5)
    table, row_of = pool.req_to_token, pool.row_of
    row_of[table[int(pool.req_pool_indices[0]), :90].long(), 0] = 0  # request 0, head 0: nothing present
    row_of[table[int(pool.req_pool_indices[1]), 5:200].long(), :] = 0  # request 1: only its first 5 tokens
    row_of[table[int(pool.req_pool_indices[2]), :2].long(), :] = 0  # request 2: nothing at all
    row_of[table[int(pool.req_pool_indices[3]), :130].long(), :] = 0  # request 3: only its last 20 tokens
    q = decode_inputs(pool, 4, seed=5)
    expected = run_decode(pool, q, 0.125, "torch")
    out, lse = run_decode(pool, q, 0.125, "triton", device, num_splits=splits)
    assert_close(out, expected[0])
    assert_close(lse, expected[1])
    out, lse = out.cpu(), lse.cpu()
    assert bool(torch.isfinite(lse[3]).all())
    # Request 0's head 0 is query heads 0..3; request 2 has no key for any head.
    assert bool((out[0, :4] == 0).all()) and bool(torch.isneginf(lse[0, :4]).all())
    assert bool(torch.isfinite(lse[0, 4:]).all())
    assert bool((out[2] == 0).all()) and bool(torch.isneginf(lse[2]).all())


@pytest.mark.parametrize(("group", "dim"), SHAPES)
def test_decode_reference_matches_dense_masked_sdpa(group, dim):
    pool = make_pool([1, 40, 67], heads=2, dim=dim, seed=group + dim)
    q = decode_inputs(pool, group, seed=group)
    scale = 1 / math.sqrt(dim)
    out, lse = run_decode(pool, q, scale, "torch")
    for b in range(3):
        k, v, present = pool.request(b)
        dense, has_keys = masked_sdpa(q[b:b + 1], k, v, present, None, scale)
        torch.testing.assert_close(out[b][has_keys[0]], dense[0][has_keys[0]], rtol=1e-5, atol=1e-5)
        assert bool((out[b][~has_keys[0]] == 0).all()) and bool(torch.isneginf(lse[b][~has_keys[0]]).all())
        assert bool(torch.isfinite(lse[b][has_keys[0]]).all())


def test_decode_with_nothing_absent_is_plain_attention():
    """Every entry present: plain (unmasked) SDPA over the request's tokens, as a dense pool computes it."""
    pool = make_pool([33, 70], heads=2, dim=64, keep=1.0, seed=8)
    q = decode_inputs(pool, 4, seed=8)
    out, _ = run_decode(pool, q, 0.125, "torch")
    for b in range(2):
        k, v, _ = pool.request(b)
        dense = scaled_dot_product_attention(q[b:b + 1].transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], scale=0.125, enable_gqa=True)
        torch.testing.assert_close(out[b], dense[0, :, 0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- extend


class Extend(NamedTuple):
    q: torch.Tensor  # (N, Hq, D)
    k: torch.Tensor  # (N, H, D): the new tokens' own keys
    v: torch.Tensor  # (N, H, Dv)
    prefix_lens: torch.Tensor  # (B,)
    q_starts: torch.Tensor  # (B,)
    q_lens: torch.Tensor  # (B,)


def extend_inputs(pool: Pool, prefix_lens: list[int], new_lens: list[int], group: int, seed: int,
                  dtype=torch.float32) -> Extend:
    g = torch.Generator().manual_seed(seed)
    heads, dim, dv = pool.row_of.shape[1], pool.k_rows.shape[1], pool.v_rows.shape[1]
    total = sum(new_lens)
    starts = [sum(new_lens[:b]) for b in range(len(new_lens))]
    return Extend(torch.randn(total, heads * group, dim, generator=g).to(dtype),
                  torch.randn(total, heads, dim, generator=g).to(dtype),
                  torch.randn(total, heads, dv, generator=g).to(dtype),
                  torch.tensor(prefix_lens), torch.tensor(starts), torch.tensor(new_lens))


def run_prefix(pool: Pool, ext: Extend, scale: float, backend: str, device: str = "cpu"):
    p = pool.to(device)
    return rk.extend_prefix_attention(ext.q.to(device), p.k_rows, p.v_rows, p.row_of, p.req_to_token,
                                      p.req_pool_indices, ext.prefix_lens.to(device), ext.q_starts.to(device),
                                      ext.q_lens.to(device), scale, backend=backend)


def run_extend(pool: Pool, ext: Extend, scale: float, backend: str, device: str = "cpu"):
    p = pool.to(device)
    return rk.extend_attention(ext.q.to(device), ext.k.to(device), ext.v.to(device), p.k_rows, p.v_rows, p.row_of,
                               p.req_to_token, p.req_pool_indices, ext.prefix_lens.to(device),
                               ext.q_starts.to(device), ext.q_lens.to(device), scale, backend=backend)


# prefix lengths (0: a fresh prefill), new-token counts (1 and 17: one query and more than a block of M rows / G)
EXTEND_CASES = [pytest.param([70], [5], id="one-request"), pytest.param([0, 63, 129], [3, 1, 17], id="three-odd")]


@pytest.mark.parametrize(("prefix_lens", "new_lens"), EXTEND_CASES)
@pytest.mark.parametrize(("group", "dim"), SHAPES)
def test_extend_prefix_matches_reference(device, poisoned_empty, group, dim, prefix_lens, new_lens):
    pool = make_pool(prefix_lens, heads=2, dim=dim, seed=group * 7 + dim)
    ext = extend_inputs(pool, prefix_lens, new_lens, group, seed=dim)
    scale = 1 / math.sqrt(dim)
    expected = run_prefix(pool, ext, scale, "torch")
    actual = run_prefix(pool, ext, scale, "triton", device)
    assert_close(actual[0], expected[0])
    assert_close(actual[1], expected[1])


@pytest.mark.parametrize(("prefix_lens", "new_lens"), EXTEND_CASES)
@pytest.mark.parametrize(("group", "dim"), SHAPES)
def test_extend_causal_matches_reference(device, poisoned_empty, group, dim, prefix_lens, new_lens):
    ext = extend_inputs(make_pool([1], heads=2, dim=dim), prefix_lens, new_lens, group, seed=group + dim)
    scale = 1 / math.sqrt(dim)
    expected = rk.extend_causal_attention(ext.q, ext.k, ext.v, ext.q_starts, ext.q_lens, scale, backend="torch")
    actual = rk.extend_causal_attention(ext.q.to(device), ext.k.to(device), ext.v.to(device),
                                        ext.q_starts.to(device), ext.q_lens.to(device), scale, backend="triton")
    assert_close(actual[0], expected[0])
    assert_close(actual[1], expected[1])
    assert bool(torch.isfinite(actual[1]).all())  # every new token sees itself


@pytest.mark.parametrize("dtype", DTYPES)
def test_extend_half_precision(device, poisoned_empty, dtype):
    pool = make_pool([50, 9], heads=2, dim=64, seed=3, dtype=dtype)
    ext = extend_inputs(pool, [50, 9], [4, 6], 4, seed=3, dtype=dtype)
    expected = run_extend(pool, ext, 0.125, "torch")
    actual = run_extend(pool, ext, 0.125, "triton", device)
    assert_close(actual[0], expected[0], dtype)
    assert_close(actual[1], expected[1], dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("group", "dim"), [pytest.param(4, 64, id="G4-D64"), pytest.param(8, 128, id="G8-D128")])
def test_extend_merged_is_causal_attention_over_present_entries(device, backend, group, dim):
    """Prefix through rows merged with the new tokens' causal part = one causal pass over prefix + new tokens with
    absent prefix entries masked (checked against dense masked SDPA and against ``head_row_attention``)."""
    if backend == "torch" and device != "cpu":
        pytest.skip("the reference is device-independent")
    prefix_lens, new_lens = [0, 45, 66], [2, 7, 1]
    pool = make_pool(prefix_lens, heads=2, dim=dim, seed=group + 11)
    ext = extend_inputs(pool, prefix_lens, new_lens, group, seed=group + 12)
    scale = 1 / math.sqrt(dim)
    out, lse = run_extend(pool, ext, scale, backend, device)
    out, lse = out.cpu(), lse.cpu()
    for b, (prefix, new) in enumerate(zip(prefix_lens, new_lens)):
        span = slice(int(ext.q_starts[b]), int(ext.q_starts[b]) + new)
        k_pre, v_pre, present_pre = pool.request(b)
        k = torch.cat([k_pre, ext.k[span]])
        v = torch.cat([v_pre, ext.v[span]])
        present = torch.cat([present_pre, torch.ones(new, 2, dtype=torch.bool)])
        visible = torch.arange(prefix + new)[None, :] <= torch.arange(prefix, prefix + new)[:, None]
        dense, has_keys = masked_sdpa(ext.q[span], k, v, present, visible, scale)
        assert bool(has_keys.all())
        torch.testing.assert_close(out[span], dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[span], head_row_attention(ext.q[span], k, v, present, visible, scale),
                                   rtol=1e-5, atol=1e-5)
    assert bool(torch.isfinite(lse).all())


def test_extend_prefix_with_nothing_present_merges_to_the_causal_part(device, poisoned_empty):
    """A head whose prefix entries are all absent has prefix lse -inf; the merge must give exactly the causal
    part there (weight 0 for the empty side, no NaN). Request 2's first prefix blocks are empty, its last not."""
    pool = make_pool([30, 20, 100], heads=2, dim=64, seed=6)
    table = pool.req_to_token
    pool.row_of[table[int(pool.req_pool_indices[0]), :30].long(), 1] = 0  # request 0, KV head 1
    pool.row_of[table[int(pool.req_pool_indices[1]), :20].long(), :] = 0  # request 1, every head
    pool.row_of[table[int(pool.req_pool_indices[2]), :70].long(), :] = 0  # request 2, its first 70 tokens
    ext = extend_inputs(pool, [30, 20, 100], [3, 4, 2], 4, seed=6)
    prefix_out, prefix_lse = run_prefix(pool, ext, 0.125, "triton", device)
    expected = run_prefix(pool, ext, 0.125, "torch")
    assert_close(prefix_out, expected[0])
    assert_close(prefix_lse, expected[1])
    prefix_out, prefix_lse = prefix_out.cpu(), prefix_lse.cpu()
    assert bool((prefix_out[:3, 4:] == 0).all()) and bool(torch.isneginf(prefix_lse[:3, 4:]).all())
    assert bool((prefix_out[3:7] == 0).all()) and bool(torch.isneginf(prefix_lse[3:7]).all())
    assert bool(torch.isfinite(prefix_lse[7:]).all())
    causal = rk.extend_causal_attention(ext.q, ext.k, ext.v, ext.q_starts, ext.q_lens, 0.125, backend="torch")
    out, lse = run_extend(pool, ext, 0.125, "triton", device)
    out, lse = out.cpu(), lse.cpu()
    torch.testing.assert_close(out[:3, 4:], causal[0][:3, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3:7], causal[0][3:7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[3:7], causal[1][3:7], rtol=1e-5, atol=1e-5)
    assert bool(torch.isfinite(out).all())


# ------------------------------------------------------------------------------------------ dispatch, checks


def test_auto_backend_is_the_reference_on_cpu(monkeypatch):
    pool = make_pool([10], heads=1, dim=16, seed=1)
    q = decode_inputs(pool, 1, seed=1)

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton path ran on CPU tensors under backend='auto'")

    monkeypatch.setattr(rk, "_decode_triton", no_triton)
    out, _ = run_decode(pool, q, 0.25, "auto")
    torch.testing.assert_close(out, run_decode(pool, q, 0.25, "torch")[0])


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pool = make_pool([10], heads=1, dim=16, seed=1)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        run_decode(pool, decode_inputs(pool, 1, seed=1), 0.25, "triton")


def test_bad_inputs_are_refused_before_launch():
    pool = make_pool([10], heads=2, dim=16, seed=1)
    q = decode_inputs(pool, 2, seed=1)
    args = (pool.k_rows, pool.v_rows, pool.row_of, pool.req_to_token, pool.req_pool_indices, pool.lengths, 0.25)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        rk.decode_attention(q[:, :3], *args)
    with pytest.raises(ValueError, match="row_of must be"):
        rk.decode_attention(q, *args[:2], pool.row_of.long(), *args[3:])
    with pytest.raises(ValueError, match="unit stride along head_dim"):
        rk.decode_attention(q, pool.k_rows.t().contiguous().t(), *args[1:])
    with pytest.raises(ValueError, match="seq_lens must be"):
        rk.decode_attention(q, *args[:5], pool.lengths.float(), 0.25)
    with pytest.raises(ValueError, match="num_splits"):
        rk.decode_attention(q, *args, num_splits=0)
    with pytest.raises(ValueError, match="k_rows and v_rows must have the same rows"):
        rk.decode_attention(q, pool.k_rows, pool.v_rows[:-1], *args[2:])


@pytest.mark.parametrize(("batch", "heads", "longest", "expected"),
                         [(1, 8, None, 16), (1, 8, 32768, 64), (1, 8, 300, 2), (128, 8, 8192, 1), (8, 8, 8192, 16),
                          (8, 8, 2048, 8)])
def test_decode_splits_heuristic(batch, heads, longest, expected):
    assert rk.decode_splits(batch, heads, longest) == expected


# -------------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_row_offsets_past_int32_on_gpu():
    """Rows whose ``row * head_dim`` element offset exceeds 2**31: the kernels must address them in int64 (run
    compiled, ``TRITON_INTERPRET=0``; needs ~4.3 GB of GPU memory)."""
    dim = 128
    rows = (2**31) // dim + 4096  # the last rows start past element 2**31
    buf = torch.zeros(rows + 1, dim, dtype=torch.bfloat16, device="cuda")
    high = torch.arange(rows - 99, rows + 1, device="cuda")  # 100 rows at the very end
    buf[high] = torch.randn(100, dim, device="cuda").bfloat16()
    row_of = torch.zeros(101, 1, dtype=torch.int32, device="cuda")
    row_of[1:, 0] = high.int()
    table = torch.arange(1, 101, dtype=torch.int32, device="cuda")[None]
    q = torch.randn(1, 4, dim, device="cuda").bfloat16()
    index, lengths = torch.zeros(1, dtype=torch.int64, device="cuda"), torch.full((1,), 100, device="cuda")
    out, lse = rk.decode_attention(q, buf, buf, row_of, table, index, lengths, 0.1, backend="triton")
    k = buf[high].float()
    weights = torch.softmax(q[0].float() @ k.t() * 0.1, dim=-1)
    torch.testing.assert_close(out[0], weights @ k, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse[0], torch.logsumexp(q[0].float() @ k.t() * 0.1, dim=-1), rtol=1e-2, atol=1e-2)
