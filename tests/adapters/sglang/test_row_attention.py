"""The ``kvpolicy_rows`` backend's per-request attention against the torch reference over head rows."""

from __future__ import annotations

import pytest

from tests.adapters.sglang.conftest import sglang_or_skip

sglang_or_skip()

import torch  # noqa: E402
from torch.nn.functional import scaled_dot_product_attention  # noqa: E402

from kvpolicy.adapters.sglang.head_rows import head_row_attention  # noqa: E402
from kvpolicy.adapters.sglang.row_attention import attend  # noqa: E402


def _inputs(total, new, heads, group, dim, seed, keep=0.6):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(new, heads * group, dim, generator=gen)
    k = torch.randn(total, heads, dim, generator=gen)
    v = torch.randn(total, heads, dim, generator=gen)
    present = torch.rand(total, heads, generator=gen) < keep
    present[total - new:] = True  # a token is judged only after its own forward: the new ones are present
    return q, k, v, present


def _causal(total, new):
    return torch.arange(total)[None, :] <= torch.arange(total - new, total)[:, None]


@pytest.mark.parametrize("total,new,heads,group,dim", [(9, 9, 2, 1, 8), (17, 1, 4, 2, 16), (33, 5, 2, 4, 5),
                                                       (64, 64, 1, 8, 32)],
                         ids=["prefill-mha", "decode-gqa2", "extend-gqa4-odd", "prefill-gqa8"])
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_heads_match_the_reference(total, new, heads, group, dim, seed):
    q, k, v, present = _inputs(total, new, heads, group, dim, seed)
    out = attend(q, k, v, present, dim ** -0.5)
    ref = head_row_attention(q, k, v, present, _causal(total, new), dim ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_absent_entries_do_not_leak_into_the_output():
    q, k, v, present = _inputs(20, 3, 2, 2, 8, seed=3)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[~present] = 1e4
    poisoned_v[~present] = 1e4
    torch.testing.assert_close(attend(q, poisoned_k, poisoned_v, present, 0.3), attend(q, k, v, present, 0.3))


def test_everything_present_is_plain_causal_attention():
    # The path taken at threshold -inf: SDPA's own causal mask over all T positions, so the outputs are what
    # SGLang's torch-native backend computes.
    q, k, v, _ = _inputs(12, 4, 2, 2, 8, seed=5)
    present = torch.ones(12, 2, dtype=torch.bool)
    padded = torch.zeros(12, 4, 8)
    padded[8:] = q
    stock = scaled_dot_product_attention(padded.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], is_causal=True, scale=0.5, enable_gqa=True)
    assert torch.equal(attend(q, k, v, present, 0.5), stock[0].transpose(0, 1)[8:])


def test_everything_present_decode_is_one_query_over_every_key():
    # SGLang's torch-native decode: the single new query attends to all T keys, no mask, no padding.
    q, k, v, _ = _inputs(12, 1, 2, 2, 8, seed=6)
    present = torch.ones(12, 2, dtype=torch.bool)
    stock = scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         scale=0.5, enable_gqa=True)
    assert torch.equal(attend(q, k, v, present, 0.5), stock[0].transpose(0, 1))
    ref = head_row_attention(q, k, v, present, _causal(12, 1), 0.5)
    torch.testing.assert_close(attend(q, k, v, present, 0.5), ref, rtol=1e-5, atol=1e-5)
