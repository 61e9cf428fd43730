"""A radix cache that really frees pruned tokens' KV slots: SGLang's ``RadixCache`` plus tombstones.

Slot ownership (the invariant the tests check after every operation)::

    capacity = allocator.available_size()          free slots
             + tree-held slots (non-dummy values)   the radix tree owns them (matched/finished prefixes)
             + request-owned slots                  tokens a running request holds outside the tree

Pruning a token frees its slot when the request owns it, or when the tree holds it but only this request has
the tree node locked (then the node's value becomes a *tombstone*: the dummy slot 0, as the SWA radix cache
does for freed window tokens). A slot that another request may read is never freed: the pruning request only
drops it from its own row.

Prefix matching with tombstones (``window`` = the policy's protected window):

- :meth:`match_prefix` (what stock SGLang scheduling calls) serves only the intact part of a cached prefix,
  i.e. up to the first tombstone, so the returned slots are 1:1 with the matched tokens as SGLang expects.
- :meth:`match_compressed` serves a compressed prefix of logical length ``m`` only if its last ``window``
  tokens are intact: a new request would still protect them, so a prefix whose window was pruned for a
  longer request must not be served as if it were what this request would have kept. It returns the slots
  with tombstones, for a request whose layout is tracked (:meth:`adopt_match`).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from kvpolicy.adapters.sglang._internals import (
    DUMMY_SLOT,
    CacheInitParams,
    EvictParams,
    EvictResult,
    InsertParams,
    MatchPrefixParams,
    MatchResult,
    RadixCache,
    RadixKey,
    TreeNode,
)
from kvpolicy.adapters.sglang.layout import SequenceLayout
from kvpolicy.kernels import compact_slots


class CompressedMatch(NamedTuple):
    """A cached prefix of ``length`` logical tokens; ``slots`` ``(length,)`` int64 with ``DUMMY_SLOT`` where
    the token was pruned; ``last_node`` is the tree node ending exactly at ``length`` (lock it to use it)."""

    length: int
    slots: torch.Tensor
    last_node: Any

    @property
    def physical_slots(self) -> torch.Tensor:
        return self.slots[self.slots != DUMMY_SLOT]


class PruneResult(NamedTuple):
    freed: int  # slots returned to the allocator
    tombstoned: int  # of which were tree values turned into tombstones
    dropped_shared: int  # tree-held slots only dropped from the request's row (another request may read them)


class PhysicalSizes(NamedTuple):
    evictable: int
    protected: int


def valid_prefix_length(values: torch.Tensor, window: int) -> int:
    """Largest ``m <= len(values)`` such that ``values[max(0, m - window):m]`` has no tombstone (``m = 0``
    always qualifies). ``window = 0`` accepts the whole compressed prefix."""
    holes = (values == DUMMY_SLOT).to(torch.int64)
    if holes.numel() == 0 or not bool(holes.any()):
        return int(values.shape[0])
    before = torch.cat([holes.new_zeros(1), holes.cumsum(0)])  # before[m] = holes in [0, m)
    ends = torch.arange(1, values.shape[0] + 1)
    starts = (ends - window).clamp(min=0)
    ok = (before[ends] - before[starts]) == 0
    valid = ends[ok]
    return int(valid.max()) if valid.numel() else 0


class KVPolicyRadixCache(RadixCache):
    """``RadixCache`` whose node values may hold tombstones, plus per-request layouts for pruned rows.

    ``window``: the policy's protected window (tokens), used for match validity. Page size must be 1 (a
    pruned token frees exactly one slot) and speculative decoding (EAGLE bigram keys) is not supported.
    Requests that were never :meth:`track`-ed (stock SGLang scheduling) keep 1:1 rows: ``match_prefix`` gives
    them only intact prefixes, and their finish/chunk inserts go through the same code with a temporary
    layout, where the only difference from ``RadixCache`` is that their intact slots heal tombstones.
    """

    def __init__(self, params: CacheInitParams, *, window: int) -> None:
        if params.page_size != 1:
            raise ValueError(f"the kvpolicy radix cache needs page_size=1 (got {params.page_size}): pruning frees "
                             "single tokens, which would leave holes inside pages")
        if params.is_eagle:
            raise ValueError("the kvpolicy radix cache does not support speculative decoding (EAGLE) yet")
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.window = window
        self._layouts: dict[str, SequenceLayout] = {}
        self.live = None  # a LiveController when the scheduler hooks drive pruning (live mode)
        super().__init__(params)

    # ------------------------------------------------------------------ request layouts

    def reset(self) -> None:
        super().reset()
        self._layouts = {}

    def layout(self, req) -> SequenceLayout | None:
        return self._layouts.get(req.rid)

    def track(self, req, logical_len: int) -> SequenceLayout:
        """Start tracking ``req`` or record its new tokens up to ``logical_len``.

        New tokens are read from ``req_to_token`` right after the request's physical length: whoever
        allocates a tracked request's new slots must write them at the *physical* end of its row.
        """
        row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
        layout = self._layouts.get(req.rid)
        if layout is None:
            layout = SequenceLayout.from_row(row[:logical_len], shared_len=req.kv.cache_protected_len)
            self._layouts[req.rid] = layout
            return layout
        new = logical_len - layout.logical_len
        if new < 0:
            raise ValueError(f"request {req.rid}: logical length went back from {layout.logical_len} to {logical_len}")
        start = layout.physical_len
        layout.append(row[start:start + new])
        return layout

    def adopt_match(self, req, match: CompressedMatch) -> SequenceLayout:
        """Give ``req`` (a new request with a row) a compressed cached prefix: lock ``match.last_node``, write
        the physical slots to the row, track it. Its next tokens have positions ``match.length`` onwards."""
        if req.rid in self._layouts:
            raise ValueError(f"request {req.rid} is already tracked")
        physical = match.physical_slots
        self.req_to_token_pool.write((req.kv.req_pool_idx, slice(0, physical.shape[0])), physical)
        self.inc_lock_ref(match.last_node)
        req.last_node = match.last_node
        req.prefix_indices = physical
        req.kv.cache_protected_len = match.length
        layout = SequenceLayout(match.slots.to(torch.int64).clone(), shared_len=match.length)
        self._layouts[req.rid] = layout
        return layout

    # ------------------------------------------------------------------ pruning

    def prune(self, req, positions: torch.Tensor, keep: torch.Tensor) -> PruneResult:
        return self.prune_batch([(req, positions, keep)])

    def prune_batch(self, items: Sequence[tuple[Any, torch.Tensor, torch.Tensor]]) -> PruneResult:
        """Apply token decisions to several tracked requests at once.

        Each item is ``(req, positions (K,) int64 logical, keep (K,) bool)``; tokens with ``keep=False`` are
        pruned. Every pruned token must still be present (pruning twice raises ValueError before anything
        changes). Rows are compacted with :func:`kvpolicy.kernels.compact_slots`; freed slots go back to the
        allocator in one call.
        """
        plans = []
        for req, positions, keep in items:
            layout = self._layouts.get(req.rid)
            if layout is None:
                raise ValueError(f"request {req.rid} is not tracked; call track() first")
            positions = positions.to(torch.int64)
            if positions.shape != keep.shape or keep.dtype != torch.bool:
                raise ValueError("positions and keep must be (K,) int64 and (K,) bool")
            drop = positions[~keep]
            if drop.numel():
                if int(drop.min()) < 0 or int(drop.max()) >= layout.logical_len:
                    raise ValueError(f"request {req.rid}: positions outside [0, {layout.logical_len})")
                if torch.unique(drop).numel() != drop.numel():
                    raise ValueError(f"request {req.rid}: a position is pruned twice in one call")
                if bool((layout.slots[drop] == DUMMY_SLOT).any()):
                    raise ValueError(f"request {req.rid}: a token is pruned that was already pruned")
            plans.append((req, layout, drop))

        rows = [p for p in plans if p[2].numel()]
        if not rows:
            return PruneResult(0, 0, 0)
        width = max(layout.physical_len for _, layout, _ in rows)
        slots = torch.zeros((len(rows), width), dtype=torch.int64)
        keep_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        release = torch.zeros((len(rows), width), dtype=torch.bool)
        lengths = torch.zeros(len(rows), dtype=torch.int64)
        tombstoned = dropped_shared = 0
        for i, (req, layout, drop) in enumerate(rows):
            phys = layout.physical_len
            slots[i, :phys] = layout.physical_row()
            lengths[i] = phys
            dropped = torch.zeros(layout.logical_len, dtype=torch.bool)
            dropped[drop] = True
            frees = dropped & (torch.arange(layout.logical_len) >= layout.shared_len)
            for p in drop[drop < layout.shared_len].tolist():
                if self._tombstone_if_sole_holder(req, layout, p):
                    frees[p] = True
                    tombstoned += 1
                else:
                    dropped_shared += 1
            present = layout.present
            keep_mask[i, :phys] = ~dropped[present]
            release[i, :phys] = frees[present]
            layout.slots[drop] = DUMMY_SLOT
        compacted, new_lengths, freed = compact_slots(slots, keep_mask, lengths)
        to_free = slots[release]
        if not bool(torch.isin(to_free, freed).all()):
            raise RuntimeError("internal error: a slot to free was kept in its row")
        for i, (req, layout, _) in enumerate(rows):
            n = int(new_lengths[i])
            self.req_to_token_pool.write((req.kv.req_pool_idx, slice(0, n)), compacted[i, :n])
            if n != layout.physical_len:
                raise RuntimeError("internal error: compacted row and layout disagree")
        self.token_to_kv_pool_allocator.free(to_free)
        return PruneResult(int(to_free.numel()), tombstoned, dropped_shared)

    def _tombstone_if_sole_holder(self, req, layout: SequenceLayout, position: int) -> bool:
        """Tree-held token ``position`` of ``req``: turn it into a tombstone if only ``req`` locks its node."""
        path = []
        node = req.last_node
        while node is not None and node is not self.root_node:
            path.append(node)
            node = node.parent
        path.reverse()
        total = sum(len(n.key) for n in path)
        if total != layout.shared_len:
            raise RuntimeError(f"request {req.rid}: tree path holds {total} tokens, layout says {layout.shared_len}")
        offset = position
        for node in path:
            if offset < len(node.key):
                if node.lock_ref != 1 or int(node.value[offset]) == DUMMY_SLOT:
                    return False
                node.value[offset] = DUMMY_SLOT
                return True
            offset -= len(node.key)
        raise RuntimeError("internal error: position not on the request's tree path")

    # ------------------------------------------------------------------ matching

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        """Longest *intact* cached prefix (stops at the first tombstone): slots 1:1 with matched tokens."""
        result = super().match_prefix(params)
        holes = torch.nonzero(result.device_indices == DUMMY_SLOT, as_tuple=False)
        if holes.numel() == 0:
            return result
        return self._match_exact(params.key, int(holes[0]))

    def match_compressed(self, key: RadixKey) -> CompressedMatch:
        """Longest cached prefix, tombstones included, that is valid for a new request (see module doc)."""
        result = super().match_prefix(MatchPrefixParams(key=key))
        values = result.device_indices.to(torch.int64)
        length = valid_prefix_length(values, self.window)
        if length < values.shape[0]:
            result = self._match_exact(key, length)
            values = values[:length]
        return CompressedMatch(length, values, result.last_device_node)

    def _match_exact(self, key: RadixKey, length: int) -> MatchResult:
        if length == 0:
            return self._empty_match_result
        # Matching the shorter key splits the node at `length`, so last_device_node ends exactly there.
        return super().match_prefix(MatchPrefixParams(key=key[:length]))

    # ------------------------------------------------------------------ finishing requests

    def cache_finished_req(self, req, is_insert: bool = True, *, kv_len_to_handle: int):
        """Insert the finished request (tombstones included) and release what the tree did not take.

        Untracked requests (rows 1:1 with tokens, stock SGLang) go through the same path with a temporary
        layout, so that their intact slots can heal tombstones (see :meth:`_insert_healing`).
        """
        if self.disable:
            return super().cache_finished_req(req, is_insert, kv_len_to_handle=kv_len_to_handle)
        if self.disable_finished_insert:
            is_insert = False
        length = kv_len_to_handle
        if self.live is not None:
            # SGLang's retract_decode releases a still running request through here (is_insert=False); it
            # re-prefills origin_input_ids + output_ids later as a fresh request, which is pruned again.
            finished = getattr(req, "finished", None)
            retracted = callable(finished) and not finished()
            self.live.forget(req.rid, self._layouts.get(req.rid), retracted=retracted)
        layout = self._layouts.pop(req.rid, None)
        if layout is None:
            layout = self._temporary_layout(req, length)
        if layout.logical_len < length:
            raise ValueError(f"request {req.rid}: layout has {layout.logical_len} tokens, asked to cache {length}")
        token_ids = (req.origin_input_ids + req.output_ids)[:length]
        values = layout.slots[:length]
        tail = layout.slots[length:]
        taken = torch.zeros(length, dtype=torch.bool)
        if is_insert and length > 0:
            key = RadixKey(token_ids, req.extra_key, cache_salt=req.cache_salt)
            prefix_len, taken = self._insert_healing(req, key, values, layout.shared_len)
        else:
            prefix_len = length
        # Our own slots the tree did not take: duplicates of an existing prefix (unless they healed a
        # tombstone), everything when not inserting, and the unhandled tail. [0, shared_len) is the tree's.
        own = values[layout.shared_len:prefix_len][~taken[layout.shared_len:prefix_len]]
        self._free_present(torch.cat([own, tail]))
        if req.last_node is not None:
            self.dec_lock_ref(req.last_node)

    def cache_unfinished_req(self, req, chunked: bool = False):
        """Insert a running request's tokens so far (chunked prefill) and point its row at the tree's slots."""
        if self.disable:
            return super().cache_unfinished_req(req, chunked=chunked)
        token_ids = req.get_fill_ids()
        length = len(token_ids)
        layout = self._layouts.get(req.rid)
        temporary = layout is None
        if temporary:
            layout = self._temporary_layout(req, length)
        if layout.logical_len != length:
            raise ValueError(f"request {req.rid}: layout has {layout.logical_len} tokens, fill ids {length}")
        key = RadixKey(token_ids, req.extra_key, cache_salt=req.cache_salt)
        prefix_len, taken = self._insert_healing(req, key, layout.slots, layout.shared_len, chunked=chunked)
        self._free_present(layout.slots[layout.shared_len:prefix_len][~taken[layout.shared_len:prefix_len]])
        matched = super().match_prefix(MatchPrefixParams(key=key))
        tree_values = matched.device_indices.to(torch.int64)
        if tree_values.shape[0] != length:
            raise RuntimeError(f"internal error: inserted {length} tokens, matched {tree_values.shape[0]}")
        gone = (layout.slots == DUMMY_SLOT) | (tree_values == DUMMY_SLOT)
        if temporary and bool(gone.any()):
            raise RuntimeError("internal error: an untracked request's row would lose tokens")
        layout.slots = torch.where(gone, torch.full_like(tree_values, DUMMY_SLOT), tree_values)
        layout.shared_len = length
        physical = layout.physical_row()
        self.req_to_token_pool.write((req.kv.req_pool_idx, slice(0, physical.shape[0])), physical)
        req.kv.cache_protected_len = length
        req.prefix_indices = physical
        if req.last_node is not None:
            self.dec_lock_ref(req.last_node)
        self.inc_lock_ref(matched.last_device_node)
        req.last_node = matched.last_device_node

    def _temporary_layout(self, req, length: int) -> SequenceLayout:
        row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :length]
        return SequenceLayout.from_row(row, shared_len=req.kv.cache_protected_len)

    def _insert_healing(self, req, key: RadixKey, values: torch.Tensor, own_from: int,
                        chunked: bool = False) -> tuple[int, torch.Tensor]:
        """Insert ``values`` under ``key``; where the tree already had the prefix, a tombstone is *healed*
        with the request's own intact slot (positions ``>= own_from``) instead of that slot being freed.

        Returns ``(prefix_len, taken)``: the length the tree already had, and ``(len(values),)`` bool marking
        the healed positions, whose slots now belong to the tree. Healing is what keeps stock (untracked)
        requests' rows 1:1: after their insert, every token of their key is intact in the tree.
        """
        priority = getattr(req, "priority", 0) or 0
        result = self.insert(InsertParams(key=key, value=values.clone(), chunked=chunked, priority=priority))
        prefix_len = result.prefix_len
        taken = torch.zeros(values.shape[0], dtype=torch.bool)
        # After insert, the key's path is made of whole nodes (insert splits where the key ends).
        node, offset = self.root_node, 0
        while offset < prefix_len:
            child = node.children[key[offset:].child_key(self.page_size)]
            end = offset + len(child.key)
            incoming = values[offset:end]
            heal = (child.value == DUMMY_SLOT) & (incoming != DUMMY_SLOT)
            heal &= torch.arange(offset, end) >= own_from
            heal &= torch.arange(offset, end) < prefix_len
            if bool(heal.any()):
                child.value[heal] = incoming[heal].to(child.value.dtype)
                taken[offset:end] |= heal
            node, offset = child, end
        return prefix_len, taken

    def _free_present(self, slots: torch.Tensor) -> None:
        slots = slots[slots != DUMMY_SLOT]
        if slots.numel():
            self.token_to_kv_pool_allocator.free(slots)

    # ------------------------------------------------------------------ eviction and sizes (physical slots)

    def evict(self, params: EvictParams) -> EvictResult:
        """Evict unlocked leaves until ``params.num_tokens`` *slots* were freed (tombstones free nothing but
        their leaves are removed on the way)."""
        if self.disable:
            return EvictResult()
        start = time.perf_counter()
        heap = [(self.eviction_strategy.get_priority(node), node) for node in self.evictable_leaves]
        heapq.heapify(heap)
        freed = 0
        while freed < params.num_tokens and heap:
            _, node = heapq.heappop(heap)
            present = node.value[node.value != DUMMY_SLOT]
            if present.numel():
                self.token_to_kv_pool_allocator.free(present)
            freed += int(present.numel())
            self._delete_leaf(node)
            parent = node.parent
            if parent is not self.root_node and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (self.eviction_strategy.get_priority(parent), parent))
            self.kv_events.record_remove(node)
        self.update_eviction_metrics(freed, start)
        return EvictResult(num_tokens_evicted=freed)

    def physical_sizes(self) -> PhysicalSizes:
        """Slots held by the tree, split by whether a request locks them. Walks the tree (O(nodes))."""
        evictable = protected = 0
        stack = list(self.root_node.children.values())
        while stack:
            node: TreeNode = stack.pop()
            if node.evicted:
                continue
            count = int((node.value != DUMMY_SLOT).sum())
            if node.lock_ref > 0:
                protected += count
            else:
                evictable += count
            stack.extend(node.children.values())
        return PhysicalSizes(evictable, protected)

    def evictable_size(self):
        return self.physical_sizes().evictable

    def protected_size(self):
        return self.physical_sizes().protected

    def total_size(self):
        sizes = self.physical_sizes()
        return sizes.evictable + sizes.protected

    def tree_slots(self) -> torch.Tensor:
        """All non-dummy slots the tree holds (for audits)."""
        values = [torch.empty(0, dtype=torch.int64)]
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            if not node.evicted:
                values.append(node.value[node.value != DUMMY_SLOT].to(torch.int64))
            stack.extend(node.children.values())
        return torch.cat(values)

    def request_owned_slots(self) -> torch.Tensor:
        """Slots tracked requests own (outside the tree), for audits."""
        owned = [torch.empty(0, dtype=torch.int64)]
        for layout in self._layouts.values():
            mine = layout.slots[layout.shared_len:]
            owned.append(mine[mine != DUMMY_SLOT])
        return torch.cat(owned)
