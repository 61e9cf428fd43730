"""SGLang 0.5.23's classic radix cache over the head-row pool: sizes and eviction in row units, and the
window rule for matching pruned prefixes.

Tree values stay real logical slots; a slot may have lost some of its ``L·H`` entries to the policy, and the
tree serves it as it is (attention reads only the kept entries). What changes:

- **Sizes.** SGLang's scheduler and its strict idle check add ``available + evictable + protected`` in dense
  tokens. With ``F`` free rows, ``E``/``P`` rows held by unlocked/locked tree nodes, ``s`` free slots and
  ``Te``/``Tp`` slots of those nodes, and ``cap(slots, rows) = min(slots, rows // (L·H))``::

      available = cap(s, F)
      evictable = cap(s + Te, F + E) - available
      protected = cap(s + Te + Tp, F + E + P) - available - evictable

  Each term is what freeing that part would add to ``available``, and the sum telescopes: when nothing but
  the tree holds rows (idle), it equals SGLang's ``max_total_num_tokens``.
- **Eviction** frees least-recently-used leaves until ``available`` grew by the tokens asked for.
- **Matching.** A cached prefix whose last ``window`` tokens lost entries is served only up to where the
  ``window`` tokens before the match's end are whole: the new request protects its own last ``window`` tokens,
  so it must not start from a copy pruned for a longer request.
"""

from __future__ import annotations

import heapq
import time
from typing import NamedTuple

import torch

from kvpolicy.adapters.sglang.row_pool import HeadRowAllocator

from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, MatchPrefixParams, MatchResult  # noqa: I001
from sglang.srt.mem_cache.radix_cache import RadixCache


class RowSizes(NamedTuple):
    available: int
    evictable: int
    protected: int
    evictable_rows: int
    protected_rows: int


def whole_prefix_length(intact: torch.Tensor, window: int) -> int:
    """Largest ``m <= len(intact)`` with ``intact[max(0, m - window):m]`` all True (``m = 0`` always
    qualifies). ``intact`` ``(n,)`` bool: whether each token of the match still holds all its entries."""
    n = int(intact.shape[0])
    if n == 0 or bool(intact.all()):
        return n
    if window == 0:
        return n
    broken = (~intact).to(torch.int64)
    before = torch.cat([broken.new_zeros(1), broken.cumsum(0)])  # before[m] = broken tokens in [0, m)
    ends = torch.arange(1, n + 1)
    ok = (before[ends] - before[(ends - window).clamp(min=0)]) == 0
    valid = ends[ok]
    return int(valid.max()) if valid.numel() else 0


class HeadRowRadixCache(RadixCache):
    """``RadixCache`` whose sizes, eviction and prefix validity count head-rows (see the module docstring)."""

    def __init__(self, params, *, window: int, controller=None) -> None:
        allocator = params.token_to_kv_pool_allocator
        if not isinstance(allocator, HeadRowAllocator):
            raise TypeError(f"HeadRowRadixCache needs the kvpolicy head-row allocator, got {type(allocator).__name__}")
        if params.page_size != 1:
            raise ValueError(f"the head-row pool needs page size 1, got {params.page_size}")
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.window = window
        self.rows = allocator.rows
        self.controller = controller  # a RowController when a policy evicts (the plugin's factory)
        self._raw_match = False  # inside checkpoint(): the tree re-matches what it just inserted
        super().__init__(params)

    def checkpoint(self, req, *, up_to: int):
        # SGLang's checkpoint inserts the request's tokens, then re-matches them and expects the whole key back
        # to re-point the request's row: that match is not a new request's, so the window rule does not apply.
        self._raw_match = True
        try:
            super().checkpoint(req, up_to=up_to)
        finally:
            self._raw_match = False

    def on_release(self, req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        if self.controller is not None:
            self.controller.on_release(req)

    # ------------------------------------------------------------------------------------------ sizes
    def row_sizes(self) -> RowSizes:
        """Walk the tree (O(nodes)) and return the telescoped sizes in dense tokens and the rows behind them."""
        live = self.rows.live
        rows_e = rows_p = slots_e = slots_p = 0
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.evicted:
                continue
            values = node.value.to("cpu", torch.int64)
            held = int(live[values].sum())
            if node.lock_ref > 0:
                rows_p, slots_p = rows_p + held, slots_p + values.numel()
            else:
                rows_e, slots_e = rows_e + held, slots_e + values.numel()
        allocator: HeadRowAllocator = self.token_to_kv_pool_allocator
        per = allocator.rows_per_slot
        free_slots, free_rows = allocator.free_slot_count(), self.rows.free_rows

        def cap(slots: int, rows: int) -> int:
            return min(slots, rows // per)

        available = cap(free_slots, free_rows)
        upto_e = cap(free_slots + slots_e, free_rows + rows_e)
        upto_p = cap(free_slots + slots_e + slots_p, free_rows + rows_e + rows_p)
        return RowSizes(available, upto_e - available, upto_p - upto_e, rows_e, rows_p)

    def evictable_size(self):
        return self.row_sizes().evictable if not self.disable else 0

    def protected_size(self):
        return self.row_sizes().protected if not self.disable else 0

    # ---------------------------------------------------------------------------------------- eviction
    def evict(self, params: EvictParams) -> EvictResult:
        """Free least-recently-used unlocked leaves until ``available_size()`` grew by ``params.num_tokens``
        (or nothing evictable is left). Reports the slots freed."""
        if self.disable:
            return EvictResult()
        started = time.perf_counter()
        allocator: HeadRowAllocator = self.token_to_kv_pool_allocator
        target = allocator.available_size() + params.num_tokens
        heap = [(self.eviction_strategy.get_priority(node), node) for node in self.evictable_leaves]
        heapq.heapify(heap)
        freed_slots = 0
        while allocator.available_size() < target and heap:
            _, node = heapq.heappop(heap)
            allocator.free_segment(node.value, start_pos=0)
            freed_slots += len(node.value)
            self._delete_leaf(node)
            parent = node.parent
            if parent is not self.root_node and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (self.eviction_strategy.get_priority(parent), parent))
            self.kv_events.record_remove(node)
        self.update_eviction_metrics(freed_slots, started)
        return EvictResult(num_tokens_evicted=freed_slots)

    # ---------------------------------------------------------------------------------------- matching
    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        """The longest cached prefix that is valid for a new request under the window rule."""
        result = super().match_prefix(params)
        length = result.device_prefix_len
        if length == 0 or self.window == 0 or self._raw_match:
            return result
        slots = self.path_device_indices(result.last_device_node).to("cpu", torch.int64)[:length]
        whole = whole_prefix_length(self.rows.live[slots] == self.rows.rows_per_slot, self.window)
        if whole == length:
            return result
        if whole == 0:
            return self._empty_match_result
        # Matching the shorter key splits the node there, so the match ends exactly at `whole`.
        return super().match_prefix(MatchPrefixParams(key=params.key[:whole]))
