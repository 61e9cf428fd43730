"""SGLang 0.5.23 classes over the head-row pool: a KV cache whose storage is :class:`HeadRowPool` and an
allocator that hands out SGLang's logical token slots together with their head-rows.

Logical slots stay SGLang's (``req_to_token``, radix-tree values, ``seq_lens`` and positions are stock, page
size 1); only the physical storage changes. A slot is given all ``L·H`` rows when it is allocated; a policy
frees single rows (:meth:`HeadRowAllocator.free_entries`); whatever a slot still holds goes back when SGLang
frees the slot (finish, tree eviction, retraction: every path ends in :meth:`HeadRowAllocator.free`).

Capacity, in SGLang's token units: ``available_size() = min(free slots, free rows // (L·H))``.

Sizing (:func:`~kvpolicy.adapters.sglang.head_rows.plan_rows`): from the dense token count ``N`` SGLang's sizing
gave, the same bytes hold ``N' = N · cell / (cell + index)`` dense tokens' rows plus the index (``row_of`` for
``k·N'`` slots and the free-row stack), where ``cell`` is the dense KV bytes per token. SGLang's
``max_total_num_tokens`` becomes ``N'`` so its accounting (admission, the strict idle check) stays exact; the
allocator has ``k·N'`` slots (``k`` = slot expansion) and ``N'·L·H`` rows.

Only the SGLang versions in ``_internals.SUPPORTED_SGLANG_VERSIONS`` are supported (the allocator contract and
the configurator's private methods are version specific).
"""

from __future__ import annotations

import torch

from kvpolicy.adapters.sglang._internals import check_sglang_version
from kvpolicy.adapters.sglang.head_rows import HeadRowPool
from kvpolicy.adapters.sglang.ranks import LocalRows, RowAgreement

check_sglang_version()

from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import KVCache, unwrap_write_loc  # noqa: E402
from sglang.srt.mem_cache.prefill_budget import PrefillBudget  # noqa: E402

MIN_KEEP_ESTIMATE = 0.25  # never plan future tokens below a quarter of their dense size
# Added to the measured keep fraction: fewer retractions when memory runs full. On the testbed (200 resident
# requests, docs/results.md section 4) 0.15 gave 20 running requests and 10 retractions, against 29 and 28 without.
KEEP_MARGIN = 0.15


class HeadRowKVCache(KVCache):
    """SGLang ``KVCache`` whose K/V live in a :class:`HeadRowPool` (``self.rows``).

    ``size`` is the number of logical slots. Writes go through ``row_of``; reads must too, so the dense-buffer
    accessors raise: only the head-row attention backend (``kvpolicy_rows``) reads this cache.
    """

    def __init__(self, *, slots: int, rows: int, dtype: torch.dtype, head_num: int, head_dim: int,
                 v_head_dim: int | None, layer_num: int, device: str, start_layer: int | None = None,
                 end_layer: int | None = None) -> None:
        super().__init__(slots, 1, dtype, layer_num, device, False, start_layer, end_layer)
        if self.store_dtype != dtype:
            raise ValueError(f"the head-row pool does not support the KV dtype {dtype} (fp8 KV cache)")
        self.head_num = head_num
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim if v_head_dim is not None else head_dim
        self.rows = HeadRowPool(layer_num, head_num, slots, rows, head_dim, self.v_head_dim, dtype, device)
        self.mem_usage = self.get_kv_size_bytes() / (1 << 30)

    def get_kv_size_bytes(self) -> int:
        r = self.rows
        return sum(t.numel() * t.element_size() for t in (r.k_rows, r.v_rows, r.row_of, r.free_stack))

    def _refuse(self, what: str):
        raise NotImplementedError(
            f"the kvpolicy head-row KV cache has no dense per-layer buffers ({what}); only the kvpolicy_rows "
            "attention backend can read it")

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        self._refuse("get_key_buffer")

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        self._refuse("get_value_buffer")

    def get_kv_buffer(self, layer_id: int):
        self._refuse("get_kv_buffer")

    def get_cpu_copy(self, indices, mamba_indices=None, req_pool_index=None):
        self._refuse("get_cpu_copy: hierarchical cache / offloading")

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None, req_pool_index=None):
        self._refuse("load_cpu_copy: hierarchical cache / offloading")

    def set_kv_buffer(self, layer, loc_info, cache_k: torch.Tensor, cache_v: torch.Tensor, k_scale=None,
                      v_scale=None, layer_id_override=None, dcp_kv_mask=None) -> None:
        if dcp_kv_mask is not None or k_scale is not None or v_scale is not None:
            raise NotImplementedError("the kvpolicy head-row KV cache does not support scaled or DCP KV writes")
        loc, swa_loc, _ = unwrap_write_loc(loc_info)
        if swa_loc is not None:
            raise NotImplementedError("the kvpolicy head-row KV cache does not support sliding-window pools")
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        n = loc.shape[0]
        k = cache_k.reshape(n, self.head_num, self.head_dim).to(self.dtype)
        v = cache_v.reshape(n, self.head_num, self.v_head_dim).to(self.dtype)
        self.rows.write(layer_id - self.start_layer, loc, k, v)

    def gather(self, layer_id: int, slots: torch.Tensor):
        """``(k (N, H, D), v (N, H, Dv), present (N, H))`` of ``layer_id``'s entries of ``slots``."""
        return self.rows.gather(layer_id - self.start_layer, slots)


class HeadRowAllocator(TokenToKVPoolAllocator):
    """SGLang's page-size-1 slot allocator, plus the head-rows of every slot it hands out.

    ``alloc(n)`` takes ``n`` slots and ``n·L·H`` rows (None when either runs short, as SGLang expects);
    ``free(slots)`` returns the slots and every row they still hold (deferred inside SGLang's free groups);
    :meth:`free_entries` returns single rows the policy dropped. ``available_size()`` is in dense tokens:
    ``min(free slots, free rows // (L·H))``.

    Under tensor parallelism (``agreement``: a :class:`~kvpolicy.adapters.sglang.ranks.TPRowAgreement`, set by the
    radix-cache factory) the free rows the scheduler sees, and ``alloc``'s answer, are the ones the TP group agreed
    on, never more than this rank has; with one rank (:class:`~kvpolicy.adapters.sglang.ranks.LocalRows`) they are
    this pool's.
    """

    def __init__(self, kvcache: HeadRowKVCache, *, device: str, need_sort: bool) -> None:
        self.agreement: RowAgreement = LocalRows()
        super().__init__(kvcache.size, kvcache.dtype, device, kvcache, need_sort)
        self.rows: HeadRowPool = kvcache.rows
        self.freed_entries = 0  # rows freed by the policy (single entries), for reports
        self.allocated_rows = 0  # rows handed out with slots, ever

    def keep_estimate(self) -> float:
        """What admission charges for tokens not written yet, as a fraction of their dense size: the fraction of
        rows requests kept so far plus ``KEEP_MARGIN`` (1.0 before anything was written; between
        ``MIN_KEEP_ESTIMATE`` and 1.0)."""
        if self.allocated_rows == 0:
            return 1.0
        kept = 1.0 - self.agreement.freed_entries(self.freed_entries) / self.allocated_rows
        return min(1.0, max(MIN_KEEP_ESTIMATE, kept + KEEP_MARGIN))

    def create_prefill_budget(self, tree_cache, *, num_mixed_decode_tokens=0):
        return RowPrefillBudget(self, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens,
                                keep=self.keep_estimate())

    @property
    def rows_per_slot(self) -> int:
        return self.rows.rows_per_slot

    def free_slot_count(self) -> int:
        return len(self.free_pages) + len(self.release_pages)

    def available_size(self) -> int:
        return min(self.free_slot_count(), self.agreement.free_rows(self.rows.free_rows) // self.rows_per_slot)

    def alloc(self, need_size: int):
        if need_size * self.rows_per_slot > self.agreement.free_rows(self.rows.free_rows):
            return None
        slots = super().alloc(need_size)
        if slots is not None and need_size:
            self.rows.alloc(slots)
            self.allocated_rows += need_size * self.rows_per_slot
            self.agreement.on_alloc(slots.to("cpu", torch.int64), need_size * self.rows_per_slot)
        return slots

    def free(self, free_index: torch.Tensor) -> None:
        if free_index.numel() == 0:
            return
        if self.free_group is None:
            self.rows.free_slots(free_index)
        self.agreement.moved()
        super().free(free_index)

    def free_entries(self, layer, slots: torch.Tensor, drop: torch.Tensor) -> int:
        """Free the rows of dropped ``(layer, slot, head)`` entries (see :meth:`HeadRowPool.free_entries`)."""
        host = slots.to("cpu", torch.int64)
        whole = self.rows.live[host] == self.rows_per_slot  # tokens that had every entry before this free
        freed = self.rows.free_entries(layer, slots, drop)
        self.freed_entries += freed
        if freed:
            self.agreement.note_broken(host[whole & drop.to("cpu").any(dim=1)])
        return freed

    def verify_byte_accounting(self) -> list:
        """Idle diagnostic: every row has one owner, and free rows + held rows = all rows."""
        try:
            self.rows.check()
        except RuntimeError as exc:
            return [f"kvpolicy head-row pool: {exc}"]
        return []

    def clear(self):
        super().clear()
        rows = getattr(self, "rows", None)
        if rows is not None and rows.held_rows:
            held = torch.nonzero(rows.live).flatten()
            rows.free_slots(held)
        self.agreement.reset()


class RowPrefillBudget(PrefillBudget):
    """SGLang's prefill budget with future tokens charged at the measured keep fraction.

    SGLang charges an admitted request its prompt now (``current_offset``) plus its expected new tokens, and each
    running request its remaining new tokens (both in ``total_offset``), all in dense tokens. A prompt's rows are
    all written before anything is pruned, so the immediate part stays dense; the part not written yet is charged
    ``keep`` of its dense size, since the policy returns the rest one window later. Under-estimating only costs a
    retraction later (SGLang's decode capacity check still counts real rows).
    """

    def __init__(self, allocator, tree_cache, *, num_mixed_decode_tokens: int = 0, keep: float = 1.0) -> None:
        super().__init__(allocator, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        self.keep = keep

    @property
    def remaining_total(self):
        future = self.total_offset - self.current_offset
        return self._available_and_evictable() - self.current_offset - self.keep * future
