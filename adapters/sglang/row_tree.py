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
- **Tensor parallelism.** The rows behind these sizes, the eviction count and the window rule's intact tokens
  are the ones the TP group agreed on (:mod:`kvpolicy.adapters.sglang.ranks`), so every rank's scheduler makes
  the same decisions; the agreements happen after each forward (:meth:`HeadRowRadixCache.after_forward`),
  before planning and idle passes when something moved (:meth:`HeadRowRadixCache.refresh`), and inside
  :meth:`HeadRowRadixCache.evict`.
- **Matching.** A cached prefix whose last ``window`` tokens lost entries is served only up to where the
  ``window`` tokens before the match's end are whole: the new request protects its own last ``window`` tokens,
  so it must not start from a copy pruned for a longer request. With a policy per request, each request's key
  carries its policy's namespace (:mod:`kvpolicy.adapters.sglang.requests`) and the rule uses that policy's
  window.
"""

from __future__ import annotations

import heapq
import time
from typing import NamedTuple

import torch

from kvpolicy.adapters.sglang.ranks import RowTotals, StepOutcome
from kvpolicy.adapters.sglang.row_pool import HeadRowAllocator  # checks the SGLang version first

# isort: split
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, MatchPrefixParams, MatchResult
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

    @property
    def agreement(self):
        return self.token_to_kv_pool_allocator.agreement

    # --------------------------------------------------------------------------- tensor-parallel agreement
    def after_forward(self) -> StepOutcome:
        """After a forward, before its results are processed: the policy's frees and failures since the last
        call, agreed by the TP group (one all_gather when there are several ranks; local otherwise)."""
        freed = failures = None
        if self.controller is not None:
            freed, failures = self.controller.take_freed(), self.controller.take_failures()
        allocator: HeadRowAllocator = self.token_to_kv_pool_allocator
        return self.agreement.sync(self._local_totals, allocator.freed_entries, freed or 0, failures or {},
                                   forward=True)

    def refresh(self) -> None:
        """Before the scheduler plans a batch or checks the pool at idle: agree on the sizes again if anything
        moved since the last agreement (nothing to do with one rank)."""
        if self.agreement.pending:
            allocator: HeadRowAllocator = self.token_to_kv_pool_allocator
            self.agreement.sync(self._local_totals, allocator.freed_entries, 0, {})

    def _local_totals(self) -> RowTotals:
        rows_e, rows_p, _, _ = self._tree_counts()
        free = self.rows.free_rows
        return RowTotals(free, free + rows_e, free + rows_e + rows_p)

    # ------------------------------------------------------------------------------------------ sizes
    def _tree_counts(self) -> tuple[int, int, int, int]:
        """Walk the tree (O(nodes)): this rank's rows and the slots of unlocked and locked nodes,
        ``(rows_e, rows_p, slots_e, slots_p)``."""
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
        return rows_e, rows_p, slots_e, slots_p

    def row_sizes(self) -> RowSizes:
        """Walk the tree (O(nodes)) and return the telescoped sizes in dense tokens and this rank's rows behind
        them (the sizes come from the agreed rows under tensor parallelism)."""
        rows_e, rows_p, slots_e, slots_p = self._tree_counts()
        allocator: HeadRowAllocator = self.token_to_kv_pool_allocator
        per = allocator.rows_per_slot
        free_slots, free_rows = allocator.free_slot_count(), self.rows.free_rows
        totals = self.agreement.totals(RowTotals(free_rows, free_rows + rows_e, free_rows + rows_e + rows_p))

        def cap(slots: int, rows: int) -> int:
            return min(slots, rows // per)

        available = cap(free_slots, totals.free)
        upto_e = cap(free_slots + slots_e, totals.free_or_evictable)
        upto_p = cap(free_slots + slots_e + slots_p, totals.free_or_cached)
        return RowSizes(available, upto_e - available, upto_p - upto_e, rows_e, rows_p)

    def evictable_size(self):
        return self.row_sizes().evictable if not self.disable else 0

    def protected_size(self):
        return self.row_sizes().protected if not self.disable else 0

    # ---------------------------------------------------------------------------------------- eviction
    def evict(self, params: EvictParams) -> EvictResult:
        """Free least-recently-used unlocked leaves until ``available_size()`` grew by ``params.num_tokens``
        (or nothing evictable is left). Reports the slots freed.

        Under tensor parallelism each rank counts the leaves it needs (its rows differ), the group takes the
        largest count (one all-reduce), every rank frees that many leaves of the same order, and the group agrees
        on the sizes again."""
        if self.disable:
            return EvictResult()
        started = time.perf_counter()
        allocator: HeadRowAllocator = self.token_to_kv_pool_allocator
        per = allocator.rows_per_slot
        target = allocator.available_size() + params.num_tokens
        order = self._eviction_order()
        chosen = []
        free_slots, free_rows = allocator.free_slot_count(), self.rows.free_rows
        while min(free_slots, free_rows // per) < target:
            node = next(order, None)
            if node is None:
                break
            chosen.append(node)
            free_slots += len(node.value)
            free_rows += int(self.rows.live[node.value.to("cpu", torch.int64)].sum())
        count = self.agreement.agree_max(len(chosen))
        while len(chosen) < count:  # another rank needs more leaves freed than this one
            node = next(order, None)
            if node is None:  # the ranks' trees differ: their schedulers did not make the same decisions
                raise RuntimeError(f"kvpolicy: another tensor-parallel rank evicts {count} tree leaves, this rank's "
                                   f"tree has {len(chosen)}")
            chosen.append(node)
        freed_slots = 0
        for node in chosen:  # leaf first: a parent comes after all its children
            allocator.free_segment(node.value, start_pos=0)
            freed_slots += len(node.value)
            self._delete_leaf(node)
            self.kv_events.record_remove(node)
        self.refresh()
        self.update_eviction_metrics(freed_slots, started)
        return EvictResult(num_tokens_evicted=freed_slots)

    def _eviction_order(self):
        """Unlocked leaves, least recently used first, then each parent once its last child came (nothing is
        freed here). Ties go by node id, which every TP rank assigns in the same order."""
        priority = self.eviction_strategy.get_priority
        heap = [(priority(node), node.id, node) for node in self.evictable_leaves]
        heapq.heapify(heap)
        children_left: dict[int, int] = {}
        while heap:
            _, _, node = heapq.heappop(heap)
            yield node
            parent = node.parent
            if parent is self.root_node or parent.lock_ref > 0:
                continue
            left = children_left.get(parent.id, len(parent.children)) - 1
            children_left[parent.id] = left
            if left == 0:
                heapq.heappush(heap, (priority(parent), parent.id, parent))

    # ------------------------------------------------------------------------------- locks and inserts
    def inc_lock_ref(self, node):
        # Nodes that become locked move their rows out of "evictable": at most all their entries on any rank.
        if not self.disable:
            newly, walk = 0, node
            while walk is not None and walk is not self.root_node:
                if walk.lock_ref == 0:
                    newly += len(walk.value)
                walk = walk.parent
            if newly:
                self.agreement.on_lock(newly * self.rows.rows_per_slot)
        return super().inc_lock_ref(node)

    def dec_lock_ref(self, node, *args, **kwargs):
        self.agreement.moved()
        return super().dec_lock_ref(node, *args, **kwargs)

    def insert(self, params):
        self.agreement.moved()
        return super().insert(params)

    # ---------------------------------------------------------------------------------------- matching
    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        """The longest cached prefix that is valid for a new request under the window rule."""
        window = self.window
        if self.controller is not None and not self._raw_match:
            window = self.controller.match_window(getattr(params, "req", None))
            if window is None:  # a request whose policy choice is refused reuses nothing (it fails when it runs)
                return self._empty_match_result
        result = super().match_prefix(params)
        length = result.device_prefix_len
        if length == 0 or window == 0 or self._raw_match:
            return result
        slots = self.path_device_indices(result.last_device_node).to("cpu", torch.int64)[:length]
        intact = self.agreement.intact(slots, self.rows.live[slots] == self.rows.rows_per_slot)
        whole = whole_prefix_length(intact, window)
        if whole == length:
            return result
        if whole == 0:
            return self._empty_match_result
        # Matching the shorter key splits the node there, so the match ends exactly at `whole`.
        return super().match_prefix(MatchPrefixParams(key=params.key[:whole]))
