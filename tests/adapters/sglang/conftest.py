"""Shared helpers for the SGLang adapter tests: the skip gate and real SGLang 0.5.23 objects over a head-row pool.

Nothing SGLang-side is mocked: ``ReqToTokenPool``, ``CacheInitParams`` and the ``KVCache`` /
``TokenToKVPoolAllocator`` / ``RadixCache`` base classes are the installed ones. This module imports neither
SGLang nor the adapter at import time, so the main venv (no SGLang) still collects the directory; each test
module calls :func:`sglang_or_skip` before importing anything from SGLang.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from typing import NamedTuple

import pytest
import torch


def sglang_or_skip() -> None:
    """Skip the calling module unless SGLang is installed; register the CPU stand-ins first (``import sglang``
    needs them on a CPU-only machine, see ``tests/support/sglang_cpu_standins.py``)."""
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("SGLang is not installed (see docs/sglang.md)", allow_module_level=True)
    from tests.support.sglang_cpu_standins import install

    install()
    warnings.filterwarnings("ignore", category=UserWarning, module=r"sglang\..*")


# The tests' standard geometry: small enough to read every row, big enough that prefixes share nodes.
LAYERS = 2
KV_HEADS = 2
HEAD_DIM = 4
DENSE_TOKENS = 32  # with float32 and slot expansion 2 this plans 23 tokens, 46 slots, 92 rows


class FakeLayer:
    """What ``set_kv_buffer`` reads off SGLang's ``RadixAttention``: its ``layer_id``."""

    def __init__(self, layer_id: int) -> None:
        self.layer_id = layer_id


class RowWorld(NamedTuple):
    """A head-row KV cache, its allocator and a head-row radix cache over them, as the plugin builds them."""

    plan: object  # RowPlan
    kv: object  # HeadRowKVCache
    alloc: object  # HeadRowAllocator
    req_pool: object  # ReqToTokenPool
    cache: object  # HeadRowRadixCache

    @property
    def rows_per_slot(self) -> int:
        return self.alloc.rows.rows_per_slot


def build_world(*, dense_tokens: int = DENSE_TOKENS, slot_expansion: int = 2, window: int = 2,
                controller=None, need_sort: bool = False) -> RowWorld:
    """Plan a pool the way the sizing hook does, then build the KV cache, allocator and radix cache."""
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    from kvpolicy.adapters.sglang.head_rows import plan_rows
    from kvpolicy.adapters.sglang.row_pool import HeadRowAllocator, HeadRowKVCache
    from kvpolicy.adapters.sglang.row_tree import HeadRowRadixCache

    plan = plan_rows(dense_tokens, num_layers=LAYERS, num_kv_heads=KV_HEADS, k_head_dim=HEAD_DIM,
                     v_head_dim=HEAD_DIM, element_size=4, slot_expansion=slot_expansion)
    kv = HeadRowKVCache(slots=plan.slots, rows=plan.rows, dtype=torch.float32, head_num=KV_HEADS,
                        head_dim=HEAD_DIM, v_head_dim=HEAD_DIM, layer_num=LAYERS, device="cpu")
    alloc = HeadRowAllocator(kv, device="cpu", need_sort=need_sort)
    req_pool = ReqToTokenPool(4, 64, "cpu", False)
    params = CacheInitParams(disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=alloc,
                             page_size=1)
    cache = HeadRowRadixCache(params, window=window, controller=controller)
    return RowWorld(plan, kv, alloc, req_pool, cache)


def tree_nodes(cache) -> list:
    """Every non-root node of ``cache`` that still holds a value."""
    nodes, stack = [], list(cache.root_node.children.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if not node.evicted:
            nodes.append(node)
    return nodes


def tree_slots(cache) -> torch.Tensor:
    """``(T,)`` int64: the slots held by the tree's nodes (with repeats, if the tree were ever broken)."""
    values = [node.value.to("cpu", torch.int64) for node in tree_nodes(cache)]
    return torch.cat(values) if values else torch.empty(0, dtype=torch.int64)


def locked_slots(cache) -> torch.Tensor:
    """``(P,)`` int64: the slots of nodes with ``lock_ref > 0``."""
    values = [node.value.to("cpu", torch.int64) for node in tree_nodes(cache) if node.lock_ref > 0]
    return torch.cat(values) if values else torch.empty(0, dtype=torch.int64)


def free_slots(alloc) -> torch.Tensor:
    """``(F,)`` int64: the allocator's free slots (free pages and pages waiting to be merged)."""
    return torch.cat([alloc.free_pages, alloc.release_pages]).to("cpu", torch.int64)


@pytest.fixture
def world() -> RowWorld:
    """The standard world: slot expansion 2 (row-bound), window 2."""
    sglang_or_skip()
    return build_world()


@contextlib.contextmanager
def root_logging_restored():
    """Undo what SGLang's ``prepare_server_args`` does to the root logger (``logging.basicConfig(force=True)``:
    a stderr handler and a level) when the block ends."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
