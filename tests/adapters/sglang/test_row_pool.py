"""The head-row KV cache and allocator as SGLang 0.5.23 subclasses: sizing, alloc/free, free groups, capacity,
writes and reads, refusals and the idle byte check."""

from __future__ import annotations

from tests.adapters.sglang.conftest import sglang_or_skip

sglang_or_skip()

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvpolicy.adapters.sglang.head_rows import ROW_ID_BYTES, plan_rows  # noqa: E402
from kvpolicy.adapters.sglang.row_pool import HeadRowAllocator, HeadRowKVCache  # noqa: E402
from tests.adapters.sglang.conftest import (  # noqa: E402
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    FakeLayer,
    build_world,
    free_slots,
)

FAST = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def layout_bytes(*, slots: int, rows: int, layers: int, heads: int, k_dim: int, v_dim: int, element: int) -> int:
    """Bytes of the tensors HeadRowPool allocates: K and V rows (plus dummy row 0), ``row_of`` (plus padding
    slot 0) and the free stack, counted from their shapes."""
    return ((rows + 1) * (k_dim + v_dim) * element + layers * (slots + 1) * heads * ROW_ID_BYTES
            + rows * ROW_ID_BYTES)


def snapshot(alloc) -> tuple:
    """Everything alloc() may change: free slots, free rows, live counts and the index."""
    return (free_slots(alloc).clone(), alloc.rows.free_rows, alloc.rows.live.clone(), alloc.rows.row_of.clone())


def assert_unchanged(before: tuple, alloc) -> None:
    after = snapshot(alloc)
    assert torch.equal(before[0], after[0]), "free slots changed"
    assert before[1] == after[1], "free rows changed"
    assert torch.equal(before[2], after[2]), "live counts changed"
    assert torch.equal(before[3], after[3]), "row_of changed"


# ------------------------------------------------------------------------------------------------ plan_rows

dims = st.fixed_dictionaries({
    "dense_tokens": st.integers(1, 5000),
    "num_layers": st.integers(1, 8),
    "num_kv_heads": st.integers(1, 8),
    "k_head_dim": st.integers(1, 160),
    "v_head_dim": st.integers(1, 160),
    "element_size": st.sampled_from([1, 2, 4]),
    "slot_expansion": st.integers(1, 4),
})


@FAST
@given(dims)
def test_plan_rows_counts_are_consistent_and_the_pool_is_as_large_as_fits(d):
    per_slot = d["num_layers"] * d["num_kv_heads"]
    cell = per_slot * (d["k_head_dim"] + d["v_head_dim"]) * d["element_size"]  # dense KV bytes per token
    # per token of capacity: its rows, row_of for slot_expansion slots, one free-stack entry per row
    per_token = cell + (d["slot_expansion"] + 1) * per_slot * ROW_ID_BYTES
    # once per pool: the dummy row 0 and the padding slot 0's row_of entries
    fixed = (d["k_head_dim"] + d["v_head_dim"]) * d["element_size"] + per_slot * ROW_ID_BYTES
    budget = d["dense_tokens"] * cell
    if budget < per_token + fixed:
        with pytest.raises(ValueError, match="no room"):
            plan_rows(**d)
        return
    plan = plan_rows(**d)
    assert plan.rows == plan.tokens * per_slot
    assert plan.slots == d["slot_expansion"] * plan.tokens
    assert plan.tokens * per_token + fixed <= budget < (plan.tokens + 1) * per_token + fixed
    assert plan.bytes <= budget
    assert plan.bytes == layout_bytes(slots=plan.slots, rows=plan.rows, layers=d["num_layers"],
                                      heads=d["num_kv_heads"], k_dim=d["k_head_dim"], v_dim=d["v_head_dim"],
                                      element=d["element_size"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_plan_bytes_are_what_the_kv_cache_allocates(dtype):
    element = torch.empty((), dtype=dtype).element_size()
    plan = plan_rows(57, num_layers=3, num_kv_heads=2, k_head_dim=6, v_head_dim=10, element_size=element,
                     slot_expansion=3)
    kv = HeadRowKVCache(slots=plan.slots, rows=plan.rows, dtype=dtype, head_num=2, head_dim=6, v_head_dim=10,
                        layer_num=3, device="cpu")
    assert kv.get_kv_size_bytes() == plan.bytes


BUDGET_CASES = [
    pytest.param(32, 2, 2, 4, 4, id="tiny-exact-fit"),
    pytest.param(100_000, 32, 8, 128, 2, id="llama8b-bf16-100k"),
    pytest.param(11, 2, 2, 4, 4, id="tiny-no-remainder"),
    pytest.param(1004, 32, 8, 128, 2, id="llama8b-bf16-1004"),
]


@pytest.mark.parametrize("dense_tokens,layers,heads,head_dim,element", BUDGET_CASES)
def test_plan_rows_fits_in_the_dense_budget(dense_tokens, layers, heads, head_dim, element):
    plan = plan_rows(dense_tokens, num_layers=layers, num_kv_heads=heads, k_head_dim=head_dim,
                     v_head_dim=head_dim, element_size=element)
    dense_budget = dense_tokens * layers * heads * (head_dim + head_dim) * element
    assert plan.bytes <= dense_budget


@pytest.mark.parametrize("dense_tokens,slot_expansion,message", [
    pytest.param(0, 2, "dense_tokens must be a positive int", id="no-tokens"),
    pytest.param(-5, 2, "dense_tokens must be a positive int", id="negative-tokens"),
    pytest.param(32, 0, "slot_expansion must be a positive int", id="no-slots"),
    pytest.param(1, 2, "leave no room", id="one-token-too-small-for-its-index"),
])
def test_plan_rows_refuses_what_cannot_hold_a_pool(dense_tokens, slot_expansion, message):
    with pytest.raises(ValueError, match=message):
        plan_rows(dense_tokens, num_layers=LAYERS, num_kv_heads=KV_HEADS, k_head_dim=HEAD_DIM, v_head_dim=HEAD_DIM,
                  element_size=4, slot_expansion=slot_expansion)


@pytest.mark.parametrize("argument", ["num_layers", "num_kv_heads"])
@pytest.mark.parametrize("value", [0, -1])
def test_plan_rows_refuses_non_positive_dimensions(argument, value):
    kwargs = dict(num_layers=LAYERS, num_kv_heads=KV_HEADS, k_head_dim=HEAD_DIM, v_head_dim=HEAD_DIM,
                  element_size=4)
    kwargs[argument] = value
    with pytest.raises(ValueError):
        plan_rows(32, **kwargs)


# ------------------------------------------------------------------------------------------------ allocator

def test_alloc_then_free_round_trips_slots_and_rows(world):
    alloc, per = world.alloc, world.rows_per_slot
    start_slots, start_rows = free_slots(alloc).numel(), alloc.rows.free_rows
    assert (start_slots, start_rows) == (world.plan.slots, world.plan.rows)

    slots = alloc.alloc(3)
    assert slots.numel() == 3 and int(slots.min()) >= 1
    assert alloc.rows.free_rows == start_rows - 3 * per
    assert alloc.rows.live[slots].tolist() == [per] * 3
    assert bool((alloc.rows.row_of[:, slots, :] != 0).all())
    assert free_slots(alloc).numel() == start_slots - 3
    alloc.rows.check()

    alloc.free(slots)
    assert alloc.rows.free_rows == start_rows
    assert alloc.rows.live[slots].tolist() == [0, 0, 0]
    assert bool((alloc.rows.row_of[:, slots, :] == 0).all())
    assert sorted(free_slots(alloc).tolist()) == list(range(1, world.plan.slots + 1))
    alloc.rows.check()


def test_alloc_of_zero_takes_nothing(world):
    before = snapshot(world.alloc)
    assert world.alloc.alloc(0).numel() == 0
    assert_unchanged(before, world.alloc)


def test_alloc_refuses_when_rows_run_short_though_slots_remain(world):
    alloc, plan = world.alloc, world.plan  # slot expansion 2: twice the slots the rows can fill
    held = alloc.alloc(plan.tokens - 2)
    assert held is not None
    before = snapshot(alloc)
    assert free_slots(alloc).numel() == plan.slots - plan.tokens + 2  # plenty of slots left
    assert alloc.alloc(3) is None
    assert_unchanged(before, alloc)
    assert alloc.alloc(2) is not None  # exactly the rows that are left
    assert alloc.rows.free_rows == 0 and alloc.alloc(1) is None


def test_alloc_refuses_when_slots_run_short_though_rows_remain():
    world = build_world(slot_expansion=1)
    alloc, plan, per = world.alloc, world.plan, world.rows_per_slot
    held = alloc.alloc(plan.tokens - 2)
    # a policy drops every head of layer 0 of all these slots: rows come back, slots do not
    alloc.free_entries(0, held, torch.ones(held.numel(), KV_HEADS, dtype=torch.bool))
    assert alloc.rows.free_rows // per >= 3
    before = snapshot(alloc)
    assert alloc.alloc(3) is None
    assert_unchanged(before, alloc)
    assert alloc.alloc(2) is not None


def test_free_inside_a_free_group_is_deferred_to_its_end(world):
    alloc, per = world.alloc, world.rows_per_slot
    first, second = alloc.alloc(2), alloc.alloc(3)
    free_rows, available = alloc.rows.free_rows, alloc.available_size()

    alloc.free_group_begin()
    alloc.free(first)
    alloc.free(second[:1])
    # inside the group nothing moved: the slots' rows are still held and readable
    assert alloc.rows.free_rows == free_rows
    assert alloc.available_size() == available
    assert alloc.rows.live[first].tolist() == [per, per]
    assert bool((alloc.rows.row_of[:, first, :] != 0).all())
    alloc.rows.check()

    alloc.free_group_end()
    assert alloc.rows.free_rows == free_rows + 3 * per
    assert alloc.available_size() == available + 3
    assert alloc.rows.live[torch.cat([first, second[:1]])].tolist() == [0, 0, 0]
    assert alloc.rows.live[second[1:]].tolist() == [per, per]
    assert alloc.verify_byte_accounting() == []


def test_free_after_free_entries_returns_exactly_the_remaining_rows(world):
    alloc, per = world.alloc, world.rows_per_slot
    slots = alloc.alloc(2)
    start = alloc.rows.free_rows
    row_of_before = alloc.rows.row_of.clone()
    drop = torch.tensor([[True, False], [True, True]])
    assert alloc.free_entries(1, slots, drop) == 3
    assert alloc.freed_entries == 3
    assert alloc.rows.free_rows == start + 3
    assert alloc.rows.live[slots].tolist() == [per - 1, per - 2]

    alloc.free(slots)
    assert alloc.rows.free_rows == start + 2 * per  # 3 pruned + the 2*per - 3 that remained, none twice
    freed = set(alloc.rows.free_stack[:alloc.rows.free_rows].tolist())
    assert set(row_of_before[:, slots, :].flatten().tolist()) <= freed
    alloc.rows.check()


def test_free_entries_of_an_already_dropped_entry_is_refused(world):
    alloc = world.alloc
    slots = alloc.alloc(1)
    alloc.free_entries(0, slots, torch.tensor([[True, False]]))
    before = snapshot(alloc)
    with pytest.raises(ValueError, match="double free"):
        alloc.free_entries(0, slots, torch.tensor([[True, True]]))
    assert_unchanged(before, alloc)


def test_available_size_is_row_bound_with_slot_expansion():
    world = build_world(slot_expansion=2)
    alloc, plan, per = world.alloc, world.plan, world.rows_per_slot
    alloc.alloc(5)
    # free slots 46 - 5 = 41, free rows (23 - 5) * 4 = 72 -> 18 tokens
    assert free_slots(alloc).numel() == plan.slots - 5
    assert alloc.available_size() == (plan.rows - 5 * per) // per == plan.tokens - 5
    assert alloc.available_size() < free_slots(alloc).numel()


def test_available_size_is_slot_bound_once_pruning_frees_rows():
    world = build_world(slot_expansion=1)
    alloc, plan, per = world.alloc, world.plan, world.rows_per_slot
    held = alloc.alloc(plan.tokens - 4)
    assert alloc.available_size() == 4  # slots and rows both allow 4
    alloc.free_entries(0, held, torch.ones(held.numel(), KV_HEADS, dtype=torch.bool))
    alloc.free_entries(1, held[:5], torch.tensor([[True, False]] * 5))
    free_rows = 4 * per + held.numel() * KV_HEADS + 5
    assert alloc.rows.free_rows == free_rows
    assert free_rows // per > 4
    assert alloc.available_size() == 4 == free_slots(alloc).numel()


@pytest.mark.parametrize("expansion", [1, 2, 3])
def test_available_size_is_the_min_of_slots_and_rows_after_mixed_traffic(expansion):
    world = build_world(slot_expansion=expansion)
    alloc, per = world.alloc, world.rows_per_slot
    generator = torch.Generator().manual_seed(expansion)
    held = []
    for step in range(12):
        slots = alloc.alloc(int(torch.randint(1, 4, (1,), generator=generator)))
        if slots is not None:
            held.append(slots)
            drop = torch.rand(slots.numel(), KV_HEADS, generator=generator) < 0.6
            alloc.free_entries(step % LAYERS, slots, drop)
        if step % 3 == 2 and held:
            alloc.free(held.pop(0))
        assert alloc.available_size() == min(free_slots(alloc).numel(), alloc.rows.free_rows // per)
    alloc.rows.check()


def test_need_sort_allocator_frees_to_release_pages_and_still_counts_them():
    world = build_world(slot_expansion=1, need_sort=True)
    alloc, per = world.alloc, world.rows_per_slot
    slots = alloc.alloc(world.plan.tokens)  # every slot: the next alloc must merge the released ones back
    alloc.free(slots[:3])
    assert alloc.release_pages.numel() == 3
    assert alloc.available_size() == 3 and alloc.rows.free_rows == 3 * per
    again = alloc.alloc(3)
    assert again is not None and sorted(again.tolist()) == sorted(slots[:3].tolist())
    alloc.rows.check()


def test_clear_returns_every_row():
    world = build_world()
    alloc = world.alloc
    slots = alloc.alloc(6)
    alloc.free_entries(0, slots[:2], torch.tensor([[True, False], [False, True]]))
    alloc.clear()
    assert alloc.rows.free_rows == world.plan.rows
    assert int(alloc.rows.live.sum()) == 0
    assert alloc.available_size() == world.plan.tokens
    alloc.rows.check()


# ------------------------------------------------------------------------------------------ KV cache I/O

@pytest.mark.parametrize("wrap", [False, True], ids=["bare-loc", "KVWriteLoc"])
def test_set_kv_buffer_then_gather_round_trips_and_padding_lands_in_the_dummy_row(world, wrap):
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    kv, alloc = world.kv, world.alloc
    slots = alloc.alloc(3)
    loc = torch.cat([torch.tensor([0]), slots[:1], torch.tensor([0]), slots[1:]])  # padding slot 0 twice
    n = loc.numel()
    generator = torch.Generator().manual_seed(0)
    k = torch.randn(n, KV_HEADS * HEAD_DIM, generator=generator)  # as attention hands it: (N, H*D)
    v = torch.randn(n, KV_HEADS, HEAD_DIM, generator=generator)
    kv.set_kv_buffer(FakeLayer(1), KVWriteLoc(loc) if wrap else loc, k, v)

    real = loc != 0
    got_k, got_v, present = kv.gather(1, loc[real])
    assert torch.equal(got_k, k.view(n, KV_HEADS, HEAD_DIM)[real])
    assert torch.equal(got_v, v[real])
    assert bool(present.all())
    _, _, present_pad = kv.gather(1, torch.tensor([0]))
    assert not bool(present_pad.any())
    # layer 0 of the same slots was not written
    other_k, _, _ = kv.gather(0, slots)
    assert not torch.equal(other_k, got_k)


def test_write_to_a_dropped_entry_does_not_touch_kept_entries(world):
    kv, alloc = world.kv, world.alloc
    slots = alloc.alloc(2)
    first = torch.arange(2 * KV_HEADS * HEAD_DIM, dtype=torch.float32).view(2, KV_HEADS, HEAD_DIM)
    kv.set_kv_buffer(FakeLayer(0), slots, first, -first)
    alloc.free_entries(0, slots, torch.tensor([[False, True], [False, False]]))
    kv.set_kv_buffer(FakeLayer(0), slots, first + 100, -first - 100)
    k, v, present = kv.gather(0, slots)
    assert present.tolist() == [[True, False], [True, True]]
    assert torch.equal(k[present], (first + 100)[present])
    assert torch.equal(v[present], (-first - 100)[present])


def test_set_kv_buffer_honours_layer_id_override(world):
    kv, alloc = world.kv, world.alloc
    slots = alloc.alloc(1)
    k = torch.ones(1, KV_HEADS, HEAD_DIM)
    kv.set_kv_buffer(FakeLayer(0), slots, k, k, layer_id_override=1)
    assert torch.equal(kv.gather(1, slots)[0], k)
    assert not torch.equal(kv.gather(0, slots)[0], k)


@pytest.mark.parametrize("call", [
    pytest.param(lambda kv: kv.get_key_buffer(0), id="get_key_buffer"),
    pytest.param(lambda kv: kv.get_value_buffer(0), id="get_value_buffer"),
    pytest.param(lambda kv: kv.get_kv_buffer(0), id="get_kv_buffer"),
    pytest.param(lambda kv: kv.get_kv_buffer_shape(), id="get_kv_buffer_shape"),
    pytest.param(lambda kv: kv.get_cpu_copy(torch.tensor([1])), id="get_cpu_copy"),
    pytest.param(lambda kv: kv.load_cpu_copy(None, torch.tensor([1])), id="load_cpu_copy"),
])
def test_dense_accessors_refuse_naming_the_row_backend(world, call):
    with pytest.raises(NotImplementedError, match="kvpolicy_rows"):
        call(world.kv)


@pytest.mark.parametrize("kwargs", [dict(k_scale=1.0), dict(v_scale=1.0), dict(dcp_kv_mask=torch.ones(1))],
                         ids=["k_scale", "v_scale", "dcp"])
def test_scaled_and_dcp_writes_are_refused(world, kwargs):
    slots = world.alloc.alloc(1)
    k = torch.ones(1, KV_HEADS, HEAD_DIM)
    with pytest.raises(NotImplementedError, match="scaled or DCP"):
        world.kv.set_kv_buffer(FakeLayer(0), slots, k, k, **kwargs)


def test_sliding_window_write_locs_are_refused(world):
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    slots = world.alloc.alloc(1)
    k = torch.ones(1, KV_HEADS, HEAD_DIM)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        world.kv.set_kv_buffer(FakeLayer(0), KVWriteLoc(slots, swa_loc=slots), k, k)


def test_kv_cache_refuses_fp8():
    with pytest.raises(ValueError, match="fp8"):
        HeadRowKVCache(slots=4, rows=8, dtype=torch.float8_e4m3fn, head_num=2, head_dim=4, v_head_dim=4,
                       layer_num=2, device="cpu")


def test_allocator_sizes_itself_from_the_kv_cache(world):
    assert isinstance(world.alloc, HeadRowAllocator)
    assert world.alloc.size == world.plan.slots
    assert world.alloc.rows is world.kv.rows
    assert world.alloc.available_size() == world.plan.tokens


# ------------------------------------------------------------------------------------- byte accounting

def _duplicate_owner(rows, slots):
    rows.row_of[0, slots[0], 0] = rows.row_of[1, slots[1], 1]


def _leak_a_row(rows, slots):
    rows.row_of[1, slots[0], 0] = 0
    rows.live[slots[0]] -= 1


def _row_both_held_and_free(rows, slots):
    rows.free_stack[rows.free_rows - 1] = rows.row_of[0, slots[0], 1]


def _live_off_by_one(rows, slots):
    rows.live[slots[1]] += 1


@pytest.mark.parametrize("corrupt,message", [
    pytest.param(_duplicate_owner, "owned by several entries", id="duplicate-owner"),
    pytest.param(_leak_a_row, "leaked", id="leaked-row"),
    pytest.param(_row_both_held_and_free, "both held and free", id="held-and-free"),
    pytest.param(_live_off_by_one, "live", id="live-count"),
])
def test_verify_byte_accounting_reports_a_corrupted_pool(world, corrupt, message):
    alloc = world.alloc
    slots = alloc.alloc(3)
    alloc.free_entries(0, slots[2:], torch.tensor([[True, False]]))
    assert alloc.verify_byte_accounting() == []
    corrupt(alloc.rows, slots)
    problems = alloc.verify_byte_accounting()
    assert len(problems) == 1
    assert problems[0].startswith("kvpolicy head-row pool") and message in problems[0]


# ------------------------------------------------------------------------------------------------ prefill budget
def test_keep_estimate_is_the_measured_fraction_of_rows_kept_plus_a_margin(world):
    from kvpolicy.adapters.sglang.row_pool import KEEP_MARGIN, MIN_KEEP_ESTIMATE

    alloc = world.alloc
    assert alloc.keep_estimate() == 1.0  # nothing written yet: stock (dense) charging
    slots = alloc.alloc(4)
    per_slot = alloc.rows_per_slot
    assert alloc.keep_estimate() == 1.0  # all kept so far; the margin does not go above dense
    drop = torch.ones(4, KV_HEADS, dtype=torch.bool)
    for layer in range(LAYERS - 1):  # keep only the last layer's rows
        alloc.free_entries(layer, slots, drop)
    kept = KV_HEADS / per_slot
    assert alloc.keep_estimate() == pytest.approx(min(1.0, max(MIN_KEEP_ESTIMATE, kept + KEEP_MARGIN)))
    alloc.free_entries(LAYERS - 1, slots, drop)  # nothing left: the estimate stops at its floor
    assert alloc.keep_estimate() == max(MIN_KEEP_ESTIMATE, KEEP_MARGIN)


def test_prefill_budget_charges_future_tokens_at_the_keep_fraction(world):
    from kvpolicy.adapters.sglang.row_pool import RowPrefillBudget

    dense = RowPrefillBudget(world.alloc, world.cache, keep=1.0)
    pruned = RowPrefillBudget(world.alloc, world.cache, keep=0.4)
    start = dense.remaining_total
    assert pruned.remaining_total == start
    for budget in (dense, pruned):
        budget.reserve(3, 10)          # a prompt of 3 now, 10 new tokens later
        budget.total_offset += 5       # what SGLang adds for a running request's remaining tokens
    immediate = 3 + world.alloc.page_size
    assert dense.remaining_total == start - immediate - 15
    assert pruned.remaining_total == pytest.approx(start - immediate - 0.4 * 15)
    assert dense.remaining_current == pruned.remaining_current == start - immediate  # the prompt stays dense
    with pytest.raises(ValueError, match="keep must be in"):
        RowPrefillBudget(world.alloc, world.cache, keep=0.0)


def test_the_allocator_hands_sglang_its_budget(world):
    from kvpolicy.adapters.sglang.row_pool import RowPrefillBudget

    budget = world.alloc.create_prefill_budget(world.cache)
    assert isinstance(budget, RowPrefillBudget) and budget.keep == world.alloc.keep_estimate()
