"""The ``kvpolicy_triton`` backend against ``kvpolicy_rows`` on the same head-row pool (SGLang 0.5.23 objects, CPU).

Both backends get the same pool, the same ``req_to_token`` table and the same ``ForwardBatch`` fields; entries are
freed through the allocator as the policy would. ``kvpolicy_triton`` runs its kernel dispatcher with the torch
references and with the Triton kernels under the interpreter (``TRITON_INTERPRET=1``, ``tests/conftest.py``).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from tests.adapters.sglang.conftest import FakeLayer, sglang_or_skip

sglang_or_skip()

import torch  # noqa: E402
from sglang.srt.layers.radix_attention import AttentionType  # noqa: E402
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool  # noqa: E402

from kvpolicy.adapters.sglang.row_attention import HeadRowAttnBackend  # noqa: E402
from kvpolicy.adapters.sglang.row_pool import HeadRowAllocator, HeadRowKVCache  # noqa: E402
from kvpolicy.adapters.sglang.triton_attention import HeadRowTritonAttnBackend  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
KERNELS = [pytest.param("torch", id="torch"),
           pytest.param("triton", id="triton-interpreted",
                        marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                 reason="Triton on CPU needs TRITON_INTERPRET=1"))]


def _layer(layer_id: int, group: int) -> SimpleNamespace:
    """What the backends read off SGLang's ``RadixAttention``."""
    return SimpleNamespace(layer_id=layer_id, tp_q_head_num=KV_HEADS * group, tp_k_head_num=KV_HEADS,
                           qk_head_dim=HEAD_DIM, v_head_dim=HEAD_DIM, scaling=HEAD_DIM ** -0.5,
                           is_cross_attention=False, attn_type=AttentionType.DECODER, sliding_window_size=-1)


class Server:
    """A head-row pool with requests in it, and both backends over it."""

    def __init__(self, kernels: str) -> None:
        self.kv = HeadRowKVCache(slots=256, rows=256 * LAYERS * KV_HEADS, dtype=torch.float32, head_num=KV_HEADS,
                                 head_dim=HEAD_DIM, v_head_dim=HEAD_DIM, layer_num=LAYERS, device="cpu")
        self.alloc = HeadRowAllocator(self.kv, device="cpu", need_sort=False)
        self.req_pool = ReqToTokenPool(4, 128, "cpu", False)
        runner = SimpleNamespace(device="cpu", req_to_token_pool=self.req_pool, token_to_kv_pool=self.kv)
        self.rows = HeadRowAttnBackend(runner)
        self.triton = HeadRowTritonAttnBackend(runner, kernel_backend=kernels)
        self.lengths: dict[int, int] = {}  # request pool index -> tokens held
        self.gen = torch.Generator().manual_seed(0)

    def prefill(self, req: int, tokens: int) -> None:
        """``tokens`` tokens written for every layer, then about two thirds of their entries freed at random."""
        slots = self.alloc.alloc(tokens)
        self.req_pool.req_to_token[req, :tokens] = slots.int()
        for layer in range(LAYERS):
            k = torch.randn(tokens, KV_HEADS * HEAD_DIM, generator=self.gen)
            v = torch.randn(tokens, KV_HEADS * HEAD_DIM, generator=self.gen)
            self.kv.set_kv_buffer(FakeLayer(layer), slots, k, v)
            drop = torch.rand(tokens, KV_HEADS, generator=self.gen) < 2 / 3
            self.alloc.free_entries(layer, slots, drop)
        self.lengths[req] = tokens

    def drop_head(self, req: int, layer: int, head: int) -> None:
        """Free every still-present entry of one (request, layer, KV head)."""
        slots = self.req_pool.req_to_token[req, :self.lengths[req]].long()
        drop = torch.zeros(slots.numel(), KV_HEADS, dtype=torch.bool)
        drop[:, head] = self.kv.rows.row_of[layer, slots, head] != 0
        self.alloc.free_entries(layer, slots, drop)

    def batch(self, new: dict[int, int], *, decode: bool) -> SimpleNamespace:
        """The ``ForwardBatch`` fields of a forward adding ``new[req]`` tokens to each request."""
        reqs = list(new)
        out_cache_loc = []
        for req in reqs:
            slots = self.alloc.alloc(new[req])
            self.req_pool.req_to_token[req, self.lengths[req]:self.lengths[req] + new[req]] = slots.int()
            out_cache_loc.append(slots)
        prefix = [self.lengths[r] for r in reqs]
        for req in reqs:
            self.lengths[req] += new[req]
        seq_lens = torch.tensor([self.lengths[r] for r in reqs])
        counts = [new[r] for r in reqs]
        fields = dict(out_cache_loc=torch.cat(out_cache_loc), req_pool_indices=torch.tensor(reqs), seq_lens=seq_lens,
                      seq_lens_cpu=seq_lens.clone())
        if not decode:
            fields.update(extend_prefix_lens=torch.tensor(prefix, dtype=torch.int32),
                          extend_seq_lens=torch.tensor(counts, dtype=torch.int32),
                          extend_start_loc=torch.tensor([sum(counts[:i]) for i in range(len(counts))],
                                                        dtype=torch.int32),
                          extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=counts)
        return SimpleNamespace(**fields)

    def qkv(self, tokens: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.randn(tokens, KV_HEADS * group * HEAD_DIM, generator=self.gen),
                torch.randn(tokens, KV_HEADS * HEAD_DIM, generator=self.gen),
                torch.randn(tokens, KV_HEADS * HEAD_DIM, generator=self.gen))


def _both(server: Server, method: str, q, k, v, layer, batch) -> tuple[torch.Tensor, torch.Tensor]:
    expected = getattr(server.rows, method)(q, k, v, layer, batch, save_kv_cache=True)
    actual = getattr(server.triton, method)(q, k, v, layer, batch, save_kv_cache=True)  # rewrites the same K/V
    return actual, expected


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("group", [1, 4], ids=["mha", "gqa4"])
def test_extend_then_decode_match_kvpolicy_rows(kernels, group):
    server = Server(kernels)
    server.prefill(1, 70)
    server.prefill(3, 9)
    server.prefill(0, 1)
    server.drop_head(3, layer=1, head=0)  # a head with no present prefix entry: only its new tokens remain
    # An extend (new tokens after a cached prefix; 17 new tokens of GQA 4 are more than one block of queries),
    # then two decode steps.
    batch = server.batch({1: 5, 3: 2, 0: 17}, decode=False)
    for layer_id in range(LAYERS):
        q, k, v = server.qkv(24, group)
        actual, expected = _both(server, "forward_extend", q, k, v, _layer(layer_id, group), batch)
        assert actual.shape == expected.shape == (24, KV_HEADS * group * HEAD_DIM)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for _ in range(2):
        batch = server.batch({1: 1, 3: 1, 0: 1}, decode=True)
        for layer_id in range(LAYERS):
            q, k, v = server.qkv(3, group)
            actual, expected = _both(server, "forward_decode", q, k, v, _layer(layer_id, group), batch)
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert server.alloc.verify_byte_accounting() == []


@pytest.mark.parametrize("kernels", KERNELS)
def test_a_fresh_prefill_is_plain_causal_attention(kernels):
    """No prefix: the prefix part is empty (lse -inf) and the merge must give the causal part alone."""
    server = Server(kernels)
    server.lengths.update({0: 0, 2: 0})
    batch = server.batch({0: 11, 2: 4}, decode=False)
    q, k, v = server.qkv(15, 2)
    actual, expected = _both(server, "forward_extend", q, k, v, _layer(0, 2), batch)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_extend_without_new_keys_reads_them_from_the_pool():
    """A layer that passes no k/v (its K/V were written before) gets its new tokens from the pool."""
    server = Server("torch")
    server.prefill(1, 20)
    batch = server.batch({1: 3}, decode=False)
    q, k, v = server.qkv(3, 2)
    layer = _layer(0, 2)
    with_keys = server.triton.forward_extend(q, k, v, layer, batch, save_kv_cache=True)
    from_pool = server.triton.forward_extend(q, None, None, layer, batch, save_kv_cache=False)
    torch.testing.assert_close(from_pool, with_keys, rtol=0, atol=0)
