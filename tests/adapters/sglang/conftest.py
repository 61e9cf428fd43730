"""Real SGLang memory pools, allocator and radix cache on CPU, and a tiny stand-in for the scheduler.

Nothing SGLang-side is mocked: ``ReqToTokenPool``, ``MHATokenToKVPool``, ``TokenToKVPoolAllocator``,
``Req`` and the ``RadixCache`` base class are the installed 0.5.19 classes. :class:`Harness` plays the
scheduler's part (allocating rows and slots, writing them at the physical end of a row, calling the cache)
the way a scheduler integration must.
"""

from __future__ import annotations

import importlib.util
import itertools
import warnings
from array import array

import pytest
import torch

CAPACITY = 96  # KV slots (slot 0 is SGLang's dummy and not counted)
ROWS = 8
MAX_CONTEXT = 160


def sglang_or_skip():
    """Skip unless SGLang is installed; register the CPU stand-ins (``import sglang`` needs them) first."""
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("SGLang is not installed (see docs/sglang.md)", allow_module_level=True)
    from tests.support.sglang_cpu_standins import install

    install()
    pytest.importorskip("sglang.srt.mem_cache.radix_cache", reason="SGLang's radix cache does not import")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"sglang\..*")


class Harness:
    """Builds the pools and cache; drives requests through prefill, pruning, decode and finish."""

    def __init__(self, window: int, capacity: int = CAPACITY, use_compressed_match: bool = True):
        from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

        from kvpolicy.adapters.sglang._internals import CacheInitParams
        from kvpolicy.adapters.sglang.cache import KVPolicyRadixCache

        self.capacity = capacity
        self.req_pool = ReqToTokenPool(ROWS, MAX_CONTEXT, "cpu", False)
        self.kv_pool = MHATokenToKVPool(capacity, 1, torch.float32, 2, 4, 2, "cpu", False)
        self.allocator = TokenToKVPoolAllocator(capacity, torch.float32, "cpu", self.kv_pool, False)
        self.cache_params = CacheInitParams(disable=False, req_to_token_pool=self.req_pool,
                                            token_to_kv_pool_allocator=self.allocator, page_size=1)
        self.cache = KVPolicyRadixCache(self.cache_params, window=window)
        self.use_compressed_match = use_compressed_match
        self.running: dict[str, object] = {}
        self.untracked: dict[str, int] = {}  # rid -> length, for requests driven like stock SGLang
        self._ids = itertools.count()

    # -- scheduler stand-in ------------------------------------------------------------------------
    def alloc(self, n: int) -> torch.Tensor:
        from kvpolicy.adapters.sglang._internals import EvictParams

        slots = self.allocator.alloc(n)
        if slots is None:
            self.cache.evict(EvictParams(num_tokens=n - self.allocator.available_size()))
            slots = self.allocator.alloc(n)
        return slots

    def start(self, tokens: list[int], track: bool = True):
        """New request: match a cached prefix, allocate and write the rest, track it. None if out of memory.

        ``track=False`` plays an unmodified SGLang scheduler: stock ``match_prefix``, a 1:1 row, no layout.
        """
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        from kvpolicy.adapters.sglang._internals import MatchPrefixParams, RadixKey
        from kvpolicy.adapters.sglang.cache import CompressedMatch

        req = Req(f"r{next(self._ids)}", "", array("q", tokens), SamplingParams())
        key = RadixKey(array("q", tokens))
        if self.use_compressed_match and track:
            match = self.cache.match_compressed(key)
        else:
            stock = self.cache.match_prefix(MatchPrefixParams(key=key))
            match = CompressedMatch(int(stock.device_indices.shape[0]), stock.device_indices.to(torch.int64),
                                    stock.last_device_node)
        # Lock the prefix before allocating, as the scheduler does, so eviction cannot take it.
        self.cache.inc_lock_ref(match.last_node)
        new = len(tokens) - match.length
        slots = self.alloc(new) if new else torch.empty(0, dtype=torch.int64)
        self.cache.dec_lock_ref(match.last_node)
        if slots is None or self.req_pool.alloc([req]) is None:
            if slots is not None:
                self.allocator.free(slots)
            return None
        if not track:  # what stock SGLang does with a stock match
            self.req_pool.write((req.kv.req_pool_idx, slice(0, match.length)), match.slots.to(torch.int32))
            self.req_pool.write((req.kv.req_pool_idx, slice(match.length, len(tokens))), slots.to(torch.int32))
            self.cache.inc_lock_ref(match.last_node)
            req.last_node, req.prefix_indices = match.last_node, match.slots
            req.kv.cache_protected_len = match.length
            self.untracked[req.rid] = len(tokens)
            self.running[req.rid] = req
            return req
        layout = self.cache.adopt_match(req, match)
        start = layout.physical_len
        self.req_pool.write((req.kv.req_pool_idx, slice(start, start + new)), slots.to(torch.int32))
        self.cache.track(req, len(tokens))
        self.running[req.rid] = req
        return req

    def length(self, req) -> int:
        layout = self.cache.layout(req)
        return layout.logical_len if layout is not None else self.untracked[req.rid]

    def decode(self, req, token: int) -> bool:
        slot = self.alloc(1)
        if slot is None:
            return False
        req.output_ids.append(token)
        layout = self.cache.layout(req)
        if layout is None:
            n = self.untracked[req.rid]
            self.req_pool.write((req.kv.req_pool_idx, slice(n, n + 1)), slot.to(torch.int32))
            self.untracked[req.rid] = n + 1
            return True
        self.req_pool.write((req.kv.req_pool_idx, slice(layout.physical_len, layout.physical_len + 1)),
                            slot.to(torch.int32))
        self.cache.track(req, layout.logical_len + 1)
        return True

    def finish(self, req) -> None:
        self.cache.cache_finished_req(req, kv_len_to_handle=self.length(req))
        self.req_pool.free(req)
        del self.running[req.rid]
        self.untracked.pop(req.rid, None)

    def untracked_owned_slots(self) -> torch.Tensor:
        owned = [torch.empty(0, dtype=torch.int64)]
        for rid, n in self.untracked.items():
            req = self.running[rid]
            owned.append(self.req_pool.req_to_token[req.kv.req_pool_idx, req.kv.cache_protected_len:n].to(torch.int64))
        return torch.cat(owned)

    # -- invariants ----------------------------------------------------------------------------------
    def free_slots(self) -> torch.Tensor:
        return torch.cat([self.allocator.free_pages, self.allocator.release_pages]).to(torch.int64)

    def audit(self) -> None:
        """free + tree-held + request-owned = capacity, with no slot in two places and no slot lost."""
        free = self.free_slots()
        tree = self.cache.tree_slots()
        owned = torch.cat([self.cache.request_owned_slots(), self.untracked_owned_slots()])
        everything = torch.cat([free, tree, owned])
        assert everything.numel() == self.capacity, (
            f"free {free.numel()} + tree {tree.numel()} + owned {owned.numel()} != capacity {self.capacity}")
        assert torch.equal(torch.sort(everything).values, torch.arange(1, self.capacity + 1)), "slot lost or doubled"
        assert self.allocator.available_size() == free.numel()
        sizes = self.cache.physical_sizes()
        assert sizes.evictable + sizes.protected == tree.numel()
        for rid, n in self.untracked.items():  # stock rows stay 1:1 with intact tree values
            req = self.running[rid]
            row = self.req_pool.req_to_token[req.kv.req_pool_idx, :n]
            assert not bool((row == 0).any()), f"{rid}: the dummy slot is in a stock request's row"
        for req in self.running.values():
            layout = self.cache.layout(req)
            if layout is None:
                continue
            row = self.req_pool.req_to_token[req.kv.req_pool_idx, : layout.physical_len].to(torch.int64)
            assert torch.equal(row, layout.physical_row()), f"{req.rid}: req_to_token row and layout differ"
            assert not bool((row == 0).any()), f"{req.rid}: the dummy slot is in a live row"


@pytest.fixture
def harness_factory():
    sglang_or_skip()
    return Harness
