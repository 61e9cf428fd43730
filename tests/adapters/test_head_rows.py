"""The head-row KV pool core and its attention reference (pure torch; no SGLang needed)."""

from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvpolicy.adapters.sglang.head_rows as head_rows
from kvpolicy.adapters.sglang.head_rows import HeadRowPool, OutOfRows, PoolInvariantError, head_row_attention

L, H, S, R, DK, DV = 2, 2, 6, 20, 3, 2  # a small pool: 4 rows per slot, room for 5 whole slots


def make_pool(layers: int = L, heads: int = H, slots: int = S, rows: int = R) -> HeadRowPool:
    return HeadRowPool(layers, heads, slots, rows, DK, DV, torch.float32)


def ids(*slots: int) -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.int64)


def mask(*rows: list[bool]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool).reshape(len(rows), -1)


def snapshot(pool: HeadRowPool) -> dict[str, object]:
    return {
        "row_of": pool.row_of.clone(),
        "free": pool.free_stack[:pool.free_rows].clone(),
        "top": pool.free_rows,
        "live": pool.live.clone(),
        "k_rows": pool.k_rows.clone(),
        "v_rows": pool.v_rows.clone(),
    }


def assert_unchanged(pool: HeadRowPool, before: dict[str, object]) -> None:
    after = snapshot(pool)
    for name, value in before.items():
        same = torch.equal(value, after[name]) if isinstance(value, torch.Tensor) else value == after[name]
        assert same, f"{name} changed"


def owners_in_python(pool: HeadRowPool) -> list[int]:
    """Every row id found in row_of and on the free stack, sorted (independent of HeadRowPool.check)."""
    held = [r for r in pool.row_of.flatten().tolist() if r != 0]
    return sorted(held + pool.free_stack[:pool.free_rows].tolist())


def numbered(n: int, dim: int, start: float) -> torch.Tensor:
    """(n, H, dim) float32 values start, start+1, ...: every element distinct and exact in float32."""
    return torch.arange(start, start + n * H * dim, dtype=torch.float32).reshape(n, H, dim)


# --------------------------------------------------------------------------------------------- construction

def test_fresh_pool_is_empty_and_consistent():
    pool = make_pool()
    assert (pool.rows_per_slot, pool.free_rows, pool.held_rows) == (L * H, R, 0)
    assert pool.row_of.shape == (L, S + 1, H) and pool.row_of.dtype == torch.int32
    assert pool.k_rows.shape == (R + 1, DK) and pool.v_rows.shape == (R + 1, DV)
    assert owners_in_python(pool) == list(range(1, R + 1))
    pool.check()


@pytest.mark.parametrize(("argument", "value"), [
    ("num_layers", 0), ("num_kv_heads", -1), ("num_slots", True), ("num_rows", 2.5), ("k_head_dim", "4"),
    ("v_head_dim", 0), ("dtype", torch.int32), ("dtype", "float32"), ("device", "no-such-device"),
])
def test_constructor_rejects_bad_arguments(argument, value):
    kwargs = dict(num_layers=L, num_kv_heads=H, num_slots=S, num_rows=R, k_head_dim=DK, v_head_dim=DV,
                  dtype=torch.float32, device="cpu")
    kwargs[argument] = value
    with pytest.raises(ValueError, match=argument):
        HeadRowPool(**kwargs)


# ------------------------------------------------------------------------------------------ happy paths

def test_alloc_write_gather_round_trip():
    pool = HeadRowPool(3, 2, 8, 60, 5, 3, torch.float32)
    slots = ids(3, 1, 7)
    pool.alloc(slots)
    assert (pool.free_rows, pool.held_rows) == (60 - 18, 18)
    assert pool.live.tolist() == [0, 6, 0, 6, 0, 0, 0, 6, 0]
    held = pool.row_of[pool.row_of != 0].tolist()
    assert len(held) == 18 and len(set(held)) == 18 and 0 not in held
    assert bool((pool.row_of[:, slots, :] != 0).all()) and int((pool.row_of != 0).sum()) == 18

    gen = torch.Generator().manual_seed(0)
    written = {layer: (torch.randn(3, 2, 5, generator=gen), torch.randn(3, 2, 3, generator=gen))
               for layer in range(3)}
    for layer, (k, v) in written.items():
        pool.write(layer, slots, k, v)
    for layer, (k, v) in written.items():  # read after all writes: no layer overwrote another
        got_k, got_v, present = pool.gather(layer, slots)
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
        assert bool(present.all())
        # a different slot order reads the same entries
        got_k, _, _ = pool.gather(layer, ids(7, 3))
        assert torch.equal(got_k, k[[2, 0]])
    pool.check()


def test_free_entries_makes_entries_absent_and_returns_their_rows():
    pool = make_pool()
    pool.alloc(ids(1, 2))
    k, v = numbered(2, DK, 0.0), numbered(2, DV, 1000.0)
    pool.write(1, ids(1, 2), k, v)
    dropped_rows = {int(pool.row_of[1, 1, 0]), int(pool.row_of[1, 2, 1])}

    freed = pool.free_entries(1, ids(1, 2), mask([True, False], [False, True]))

    assert freed == 2
    assert (pool.free_rows, pool.held_rows) == (R - 8 + 2, 8 - 2)
    assert set(pool.free_stack[:pool.free_rows].tolist()[-2:]) == dropped_rows
    assert pool.live[[1, 2]].tolist() == [L * H - 1, L * H - 1]
    got_k, got_v, present = pool.gather(1, ids(1, 2))
    assert present.tolist() == [[False, True], [True, False]]
    assert torch.equal(got_k[present], k[present]) and torch.equal(got_v[present], v[present])
    assert bool(pool.gather(0, ids(1, 2))[2].all())  # the other layer keeps every head
    assert owners_in_python(pool) == list(range(1, R + 1))
    pool.check()


def test_free_entries_with_one_layer_per_row():
    pool = make_pool()
    pool.alloc(ids(1, 3))
    freed = pool.free_entries(ids(0, 1, 1), ids(1, 1, 3), mask([True, True], [False, True], [True, False]))
    assert freed == 4
    assert pool.gather(0, ids(1, 3))[2].tolist() == [[False, False], [True, True]]
    assert pool.gather(1, ids(1, 3))[2].tolist() == [[True, False], [False, True]]
    assert pool.live[[1, 3]].tolist() == [1, 3]
    pool.check()


def test_free_entries_with_nothing_dropped_changes_nothing():
    pool = make_pool()
    pool.alloc(ids(2))
    before = snapshot(pool)
    assert pool.free_entries(0, ids(2), mask([False, False])) == 0
    assert pool.free_entries(0, ids(), torch.zeros(0, H, dtype=torch.bool)) == 0
    assert_unchanged(pool, before)


def test_free_slots_returns_every_remaining_row():
    pool = make_pool()
    pool.alloc(ids(1, 2, 4))
    pool.free_entries(0, ids(1, 4), mask([True, False], [True, True]))
    assert pool.free_rows + pool.held_rows == R

    freed = pool.free_slots(ids(4, 1))

    assert freed == (L * H - 2) + (L * H - 1)
    assert pool.live.tolist() == [0, 0, L * H, 0, 0, 0, 0]
    assert bool((pool.row_of[:, [1, 4], :] == 0).all()) and bool((pool.row_of[:, 2, :] != 0).all())
    assert (pool.free_rows, pool.held_rows) == (R - L * H, L * H)
    assert owners_in_python(pool) == list(range(1, R + 1))
    pool.check()
    assert pool.free_slots(ids(2)) == L * H
    assert (pool.free_rows, pool.held_rows) == (R, 0)
    assert not bool(pool.row_of.any())
    pool.check()


def test_free_slots_of_slots_without_rows_is_a_no_op():
    pool = make_pool()
    pool.alloc(ids(5))
    pool.free_entries(ids(0, 1), ids(5, 5), mask([True, True], [True, True]))  # slot 5 lost every head
    before = snapshot(pool)
    assert pool.free_slots(ids(5, 6)) == 0
    assert_unchanged(pool, before)
    pool.alloc(ids(5))  # a slot with no rows left can be allocated again
    pool.check()


def test_freed_rows_are_reused():
    pool = make_pool(rows=8)  # exactly two slots
    pool.alloc(ids(1, 2))
    assert pool.free_rows == 0
    with pytest.raises(OutOfRows):
        pool.alloc(ids(3))
    dropped = {int(pool.row_of[0, 1, 0]), int(pool.row_of[1, 1, 1]), int(pool.row_of[0, 2, 0]),
               int(pool.row_of[0, 2, 1])}
    pool.free_entries(0, ids(1, 2), mask([True, False], [True, True]))
    pool.free_entries(1, ids(1), mask([False, True]))

    pool.alloc(ids(3))

    assert set(pool.row_of[:, 3, :].flatten().tolist()) == dropped
    assert pool.free_rows == 0
    pool.check()


def test_alloc_that_fits_exactly_succeeds_and_one_more_slot_does_not():
    pool = make_pool(rows=3 * L * H)
    before = snapshot(pool)
    with pytest.raises(OutOfRows, match="needs 16 rows"):
        pool.alloc(ids(1, 2, 3, 4))
    assert_unchanged(pool, before)
    pool.alloc(ids(1, 2, 3))
    assert pool.free_rows == 0
    pool.check()


def test_writes_to_absent_entries_and_padding_land_in_the_dummy_row():
    pool = make_pool()
    pool.alloc(ids(1, 2))
    pool.write(0, ids(1, 2), numbered(2, DK, 0.0), numbered(2, DV, 0.0))
    pool.free_entries(0, ids(2), mask([True, True]))
    real_k, real_v = pool.k_rows[1:].clone(), pool.v_rows[1:].clone()

    pool.write(0, ids(0, 2), torch.full((2, H, DK), 7.0), torch.full((2, H, DV), 7.0))

    assert torch.equal(pool.k_rows[1:], real_k) and torch.equal(pool.v_rows[1:], real_v)
    assert bool((pool.k_rows[0] == 7.0).all()) and bool((pool.v_rows[0] == 7.0).all())
    _, _, present = pool.gather(0, ids(0, 2))
    assert not bool(present.any())


def test_row_of_uses_int32_and_gather_returns_pool_dtype():
    pool = HeadRowPool(L, H, S, R, DK, DV, torch.bfloat16)
    pool.alloc(ids(1))
    k = torch.randn(1, H, DK).to(torch.bfloat16)
    pool.write(0, ids(1), k, torch.zeros(1, H, DV, dtype=torch.bfloat16))
    got_k, got_v, present = pool.gather(0, ids(1))
    assert got_k.dtype == got_v.dtype == torch.bfloat16 and present.dtype == torch.bool
    assert torch.equal(got_k, k)
    assert pool.row_of.dtype == pool.free_stack.dtype == torch.int32


# ------------------------------------------------------------------------------------------ refusals

def busy_pool() -> HeadRowPool:
    """Slots 1, 2, 3 allocated; slot 2 lost (layer 0, head 0); 9 rows free."""
    pool = make_pool()
    pool.alloc(ids(1, 2, 3))
    pool.free_entries(0, ids(2), mask([True, False]))
    pool.write(0, ids(1, 2, 3), numbered(3, DK, 0.0), numbered(3, DV, 100.0))
    return pool


REFUSALS = [
    pytest.param(lambda p: p.alloc(ids(0)), ValueError, "padding", id="alloc-slot-0"),
    pytest.param(lambda p: p.alloc(ids(4, 7)), ValueError, r"1\.\.6", id="alloc-out-of-range"),
    pytest.param(lambda p: p.alloc(ids(-1)), ValueError, r"1\.\.6", id="alloc-negative"),
    pytest.param(lambda p: p.alloc(ids(4, 4)), ValueError, "repeats", id="alloc-duplicate"),
    pytest.param(lambda p: p.alloc(ids(4, 2)), ValueError, "still hold", id="alloc-partly-held-slot"),
    pytest.param(lambda p: p.alloc(ids(1)), ValueError, "still hold", id="alloc-held-slot"),
    pytest.param(lambda p: p.alloc(ids(4, 5, 6)), OutOfRows, "only 9", id="alloc-out-of-rows"),
    pytest.param(lambda p: p.alloc(torch.tensor([4.0])), ValueError, "integer", id="alloc-float-slots"),
    pytest.param(lambda p: p.alloc([4]), ValueError, "slots", id="alloc-list-slots"),
    pytest.param(lambda p: p.free_slots(ids(1, 0)), ValueError, "padding", id="free_slots-slot-0"),
    pytest.param(lambda p: p.free_slots(ids(1, 7)), ValueError, r"1\.\.6", id="free_slots-out-of-range"),
    pytest.param(lambda p: p.free_slots(ids(1, 1)), ValueError, "repeats", id="free_slots-duplicate"),
    pytest.param(lambda p: p.free_entries(0, ids(3, 2), mask([True, False], [True, False])), ValueError,
                 "double free", id="free_entries-double-free"),
    pytest.param(lambda p: p.free_entries(1, ids(5), mask([False, True])), ValueError, "double free",
                 id="free_entries-unallocated-slot"),
    pytest.param(lambda p: p.free_entries(0, ids(1, 1), mask([True, False], [False, True])), ValueError, "twice",
                 id="free_entries-duplicate-slot"),
    pytest.param(lambda p: p.free_entries(ids(1, 1), ids(3, 3), mask([True, False], [False, True])), ValueError,
                 "twice", id="free_entries-duplicate-pair"),
    pytest.param(lambda p: p.free_entries(2, ids(1), mask([True, False])), ValueError, "layer",
                 id="free_entries-layer-out-of-range"),
    pytest.param(lambda p: p.free_entries(ids(0, 2), ids(1, 3), mask([True, False], [True, False])), ValueError,
                 "layer", id="free_entries-layers-out-of-range"),
    pytest.param(lambda p: p.free_entries(0, ids(0), mask([True, False])), ValueError, "padding",
                 id="free_entries-slot-0"),
    pytest.param(lambda p: p.free_entries(0, ids(1), torch.ones(1, 3, dtype=torch.bool)), ValueError, "drop",
                 id="free_entries-drop-shape"),
    pytest.param(lambda p: p.free_entries(0, ids(1), torch.ones(1, H, dtype=torch.int64)), ValueError, "drop",
                 id="free_entries-drop-not-bool"),
    pytest.param(lambda p: p.write(0, ids(1), torch.zeros(1, H, DK + 1), torch.zeros(1, H, DV)), ValueError,
                 "k must be", id="write-k-shape"),
    pytest.param(lambda p: p.write(0, ids(1), torch.zeros(1, H, DK), torch.zeros(2, H, DV)), ValueError,
                 "v must be", id="write-v-shape"),
    pytest.param(lambda p: p.write(0, ids(1), torch.zeros(1, H, DK, dtype=torch.float64), torch.zeros(1, H, DV)),
                 ValueError, "float32", id="write-dtype"),
    pytest.param(lambda p: p.write(2, ids(1), torch.zeros(1, H, DK), torch.zeros(1, H, DV)), ValueError,
                 "layer", id="write-layer"),
    pytest.param(lambda p: p.write(True, ids(1), torch.zeros(1, H, DK), torch.zeros(1, H, DV)), ValueError,
                 "layer", id="write-bool-layer"),
    pytest.param(lambda p: p.gather(0, ids(1, 2).reshape(2, 1)), ValueError, "1-D", id="gather-2d-slots"),
]


@pytest.mark.parametrize(("call", "error", "message"), REFUSALS)
def test_refusals_leave_the_pool_unchanged(call, error, message):
    pool = busy_pool()
    before = snapshot(pool)
    with pytest.raises(error, match=message):
        call(pool)
    assert_unchanged(pool, before)
    pool.check()


def test_out_of_rows_is_a_runtime_error():
    assert issubclass(OutOfRows, RuntimeError) and issubclass(PoolInvariantError, RuntimeError)


# ------------------------------------------------------------------------------------------ check()

def _corrupt_shared_row(p: HeadRowPool) -> None:
    p.row_of[1, 3, 1] = p.row_of[0, 1, 0]


def _corrupt_held_and_free(p: HeadRowPool) -> None:
    p.free_stack[p.free_rows - 1] = p.row_of[0, 1, 0]


def _corrupt_free_twice(p: HeadRowPool) -> None:
    p.free_stack[0] = p.free_stack[1]


def _corrupt_leak(p: HeadRowPool) -> None:
    p.row_of[1, 1, 1] = 0
    p.live[1] -= 1


def _corrupt_live(p: HeadRowPool) -> None:
    p.live[3] += 1


def _corrupt_padding(p: HeadRowPool) -> None:
    p.row_of[0, 0, 0] = p.row_of[0, 1, 0]


def _corrupt_range(p: HeadRowPool) -> None:
    p.row_of[0, 1, 0] = R + 1


def _corrupt_top(p: HeadRowPool) -> None:
    p._top = R + 1


def _corrupt_stack_top_down(p: HeadRowPool) -> None:
    p._top -= 1  # the row that was on top is now owned by nobody


@pytest.mark.parametrize(("corrupt", "message"), [
    pytest.param(_corrupt_shared_row, "several entries", id="row-held-twice"),
    pytest.param(_corrupt_held_and_free, "both held and free", id="row-held-and-free"),
    pytest.param(_corrupt_free_twice, "free stack more than once", id="row-free-twice"),
    pytest.param(_corrupt_leak, "leaked", id="row-leaked"),
    pytest.param(_corrupt_stack_top_down, "leaked", id="stack-top-lost-a-row"),
    pytest.param(_corrupt_live, r"live\[3\]", id="live-count-wrong"),
    pytest.param(_corrupt_padding, "padding slot 0", id="padding-slot-holds-a-row"),
    pytest.param(_corrupt_range, "outside", id="row-id-out-of-range"),
    pytest.param(_corrupt_top, "top", id="stack-top-out-of-range"),
])
def test_check_names_each_broken_invariant(corrupt, message):
    pool = busy_pool()
    pool.check()
    corrupt(pool)
    with pytest.raises(PoolInvariantError, match=message):
        pool.check()


def test_module_imports_only_torch_and_the_standard_library():
    tree = ast.parse(Path(head_rows.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots - {"torch", "__future__"} <= set(sys.stdlib_module_names), roots


# ----------------------------------------------------------------------------------- stateful property

slot_lists = st.lists(st.integers(0, S + 1), max_size=4)  # 0 and S+1 are invalid; repeats happen too
MACHINE_ROWS = 18  # four whole slots and two spare rows: OutOfRows comes up often
valid_slot_lists = st.lists(st.integers(1, S), min_size=1, max_size=2, unique=True)


class HeadRowPoolMachine(RuleBasedStateMachine):
    """Random alloc / free_entries / free_slots / write programs against a plain Python model.

    The model knows which (layer, slot, head) entries hold a row and what was last written to each; it knows
    nothing of row ids, so it cannot share a bug with the pool's bookkeeping. Each rule decides from the
    model alone whether the call must succeed or be refused, and a refusal must leave the pool unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool = make_pool(rows=MACHINE_ROWS)
        self.present: set[tuple[int, int, int]] = set()
        self.written: dict[tuple[int, int, int], tuple[list[float], list[float]]] = {}
        self.next_value = 0.0

    def _held(self, slot: int) -> bool:
        return any(entry[1] == slot for entry in self.present)

    def _refused(self, call, error) -> None:
        before = snapshot(self.pool)
        with pytest.raises(error):
            call()
        assert_unchanged(self.pool, before)
        event(f"refused: {error.__name__}")

    def _forget(self, entries) -> None:
        self.present.difference_update(entries)
        for entry in entries:
            self.written.pop(entry, None)

    @staticmethod
    def _valid(slots: list[int]) -> bool:
        return all(1 <= s <= S for s in slots) and len(set(slots)) == len(slots)

    @rule(slots=st.one_of(valid_slot_lists, slot_lists))
    def alloc(self, slots):
        call = lambda: self.pool.alloc(ids(*slots))  # noqa: E731
        if not self._valid(slots) or any(self._held(s) for s in slots):
            return self._refused(call, ValueError)
        if len(slots) * L * H > MACHINE_ROWS - len(self.present):
            return self._refused(call, OutOfRows)
        call()
        event("alloc")
        for slot in slots:
            for layer in range(L):
                for head in range(H):
                    self.present.add((layer, slot, head))
                    assert (layer, slot, head) not in self.written  # forgotten when it was freed

    def _free_entries(self, layer: int | None, layers: list[int], slots: list[int], drop: list[list[bool]]):
        """``layer`` None: pass ``layers`` as a per-row tensor; else pass ``layer`` (and ``layers`` repeats it)."""
        drop_t = torch.tensor(drop, dtype=torch.bool).reshape(len(slots), H)
        layer_arg = ids(*layers) if layer is None else layer
        call = lambda: self.pool.free_entries(layer_arg, ids(*slots), drop_t)  # noqa: E731
        pairs = list(zip(layers, slots))
        entries = [(lay, s, h) for (lay, s), bits in zip(pairs, drop) for h in range(H) if bits[h]]
        if (not all(1 <= s <= S for s in slots) or len(set(pairs)) != len(pairs)
                or any(e not in self.present for e in entries)):
            return self._refused(call, ValueError)
        assert call() == len(entries)
        event("free_entries" if entries else "free_entries: nothing dropped")
        self._forget(entries)

    @rule(layer=st.integers(0, L - 1), slots=slot_lists, bits=st.lists(st.booleans(), min_size=4 * H, max_size=4 * H))
    def free_entries_anywhere(self, layer, slots, bits):
        drop = [bits[i * H:(i + 1) * H] for i in range(len(slots))]
        self._free_entries(layer, [layer] * len(slots), slots, drop)

    @precondition(lambda self: self.present)
    @rule(data=st.data())
    def free_entries_of_held_slots(self, data):
        per_row = data.draw(st.booleans(), label="one layer per row")
        layer = None if per_row else data.draw(st.sampled_from(sorted({e[0] for e in self.present})), label="layer")
        candidates = sorted({(e[0], e[1]) for e in self.present if layer is None or e[0] == layer})
        pairs = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3, unique=True), label="pairs")
        sloppy = data.draw(st.integers(0, 9), label="sloppy") == 0  # now and then drop absent entries too
        drop = [[data.draw(st.booleans()) and (sloppy or (lay, s, h) in self.present) for h in range(H)]
                for lay, s in pairs]
        self._free_entries(layer, [lay for lay, _ in pairs], [s for _, s in pairs], drop)

    @rule(slots=st.one_of(valid_slot_lists, slot_lists))
    def free_slots(self, slots):
        call = lambda: self.pool.free_slots(ids(*slots))  # noqa: E731
        if not self._valid(slots):
            return self._refused(call, ValueError)
        entries = {e for e in self.present if e[1] in slots}
        assert call() == len(entries)
        event("free_slots" if entries else "free_slots: nothing held")
        self._forget(entries)

    @rule(layer=st.integers(0, L - 1), slots=st.lists(st.integers(0, S), max_size=4, unique=True))
    def write(self, layer, slots):
        k, v = numbered(len(slots), DK, self.next_value), numbered(len(slots), DV, self.next_value + 10_000)
        self.next_value += 100
        self.pool.write(layer, ids(*slots), k, v)
        for i, slot in enumerate(slots):
            for head in range(H):
                if (layer, slot, head) in self.present:
                    self.written[(layer, slot, head)] = (k[i, head].tolist(), v[i, head].tolist())

    @invariant()
    def pool_matches_model(self):
        pool = self.pool
        pool.check()
        assert owners_in_python(pool) == list(range(1, MACHINE_ROWS + 1))
        assert pool.held_rows == len(self.present) and pool.free_rows == MACHINE_ROWS - len(self.present)
        assert pool.live.tolist() == [sum(1 for e in self.present if e[1] == s) for s in range(S + 1)]
        every_slot = torch.arange(S + 1)
        for layer in range(L):
            k, v, present = pool.gather(layer, every_slot)
            for slot in range(S + 1):
                for head in range(H):
                    entry = (layer, slot, head)
                    assert bool(present[slot, head]) == (entry in self.present), entry
                    if entry in self.written:
                        assert (k[slot, head].tolist(), v[slot, head].tolist()) == self.written[entry], entry


HeadRowPoolMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=25, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestHeadRowPoolMachine = HeadRowPoolMachine.TestCase


# ------------------------------------------------------------------------------------------ attention

def dense_attention(q, k, v, present, visible, scale):
    """Per (query, query head): softmax over exactly the keys its KV head may use, in float64."""
    M, Hq, _ = q.shape
    heads = k.shape[1]
    group = Hq // heads
    out = torch.zeros(M, Hq, v.shape[-1], dtype=torch.float64)
    for j in range(Hq):
        kv_head = j // group
        allowed = visible & present[:, kv_head][None, :]  # (M, N): the explicit per-KV-head mask
        for m in range(M):
            used = torch.nonzero(allowed[m]).flatten()
            if used.numel() == 0:
                continue
            scores = (k[used, kv_head].double() @ q[m, j].double()) * scale
            out[m, j] = torch.softmax(scores, dim=0) @ v[used, kv_head].double()
    return out


def attention_case(group: int, heads: int = 2, queries: int = 6, keys: int = 7, dk: int = 5, dv: int = 3,
                   seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(queries, heads * group, dk, generator=gen)
    k = torch.randn(keys, heads, dk, generator=gen)
    v = torch.randn(keys, heads, dv, generator=gen)
    present = torch.rand(keys, heads, generator=gen) < 0.7
    causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    visible = causal & (torch.rand(queries, keys, generator=gen) < 0.9)
    visible[0] = False  # a query that sees nothing at all
    visible[1] = causal[1]  # query 1 sees keys 0..2, all absent on KV head 0 but not on KV head 1
    present[0:3, 0] = False
    present[0, 1] = True
    return q, k, v, present, visible


@pytest.mark.parametrize("group", [1, 2, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("seed", [0, 1])
def test_head_row_attention_matches_dense_masked_attention(group, seed):
    q, k, v, present, visible = attention_case(group, seed=seed)
    scale = 1 / math.sqrt(5)
    out = head_row_attention(q, k, v, present, visible, scale)
    assert out.shape == (6, 2 * group, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, present, visible, scale),
                               rtol=1e-5, atol=1e-6)
    assert bool((out[0] == 0).all())  # sees nothing
    assert bool((out[1, :group] == 0).all()) and bool((out[1, group:] != 0).all())  # KV head 0 has nothing


def test_head_row_attention_keeps_q_dtype():
    q, k, v, present, visible = attention_case(2)
    out = head_row_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), present, visible, 0.5)
    assert out.dtype == torch.bfloat16
    ref = dense_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), present, visible, 0.5)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30], ids=["nan", "inf", "huge"])
def test_absent_and_masked_contents_never_reach_the_output(poison):
    q, k, v, present, visible = attention_case(4)
    clean = head_row_attention(q, k, v, present, visible, 0.3)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[~present] = poison
    v_bad[~present] = poison
    out = head_row_attention(q, k_bad, v_bad, present, visible, 0.3)
    assert not bool(out.isnan().any())
    assert torch.equal(out, clean)
    assert bool((out[0] == 0).all())


def test_attention_through_the_pool_ignores_the_dummy_row():
    """gather + head_row_attention end to end, with the dummy row and every freed row poisoned."""
    pool = HeadRowPool(1, 2, 8, 32, 5, 3, torch.float32)
    slots = ids(2, 5, 1, 7, 3, 8, 4)
    pool.alloc(slots)
    _, k, v, present, visible = attention_case(2, keys=7)
    q = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(3))
    pool.write(0, slots, k, v)
    dropped_rows = pool.row_of[0, slots][~present]
    assert pool.free_entries(0, slots, ~present) == int((~present).sum())
    for rows in (pool.k_rows, pool.v_rows):
        rows[0] = float("nan")
        rows[dropped_rows.long()] = float("nan")

    got_k, got_v, got_present = pool.gather(0, torch.cat([slots, ids(0)]))  # plus a padding slot
    assert torch.equal(got_present[:-1], present) and not bool(got_present[-1].any())
    out = head_row_attention(q, got_k, got_v, got_present, torch.cat([visible, torch.ones(6, 1, dtype=torch.bool)], 1),
                             0.4)
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, present, visible, 0.4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("shapes", "message"), [
    pytest.param(dict(q=(2, 3, 4)), "multiple", id="hq-not-multiple-of-h"),
    pytest.param(dict(k=(5, 2, 3)), "k must be", id="k-head-dim"),
    pytest.param(dict(v=(4, 2, 3)), "v must be", id="v-tokens"),
    pytest.param(dict(present=(5, 1)), "present", id="present-shape"),
    pytest.param(dict(visible=(3, 5)), "visible", id="visible-shape"),
    pytest.param(dict(q=(2, 4)), "q must be", id="q-rank"),
])
def test_head_row_attention_rejects_mismatched_shapes(shapes, message):
    sizes = dict(q=(2, 4, 4), k=(5, 2, 4), v=(5, 2, 3), present=(5, 2), visible=(2, 5))
    sizes.update(shapes)
    args = {name: (torch.ones(size, dtype=torch.bool) if name in ("present", "visible") else torch.zeros(size))
            for name, size in sizes.items()}
    with pytest.raises(ValueError, match=message):
        head_row_attention(**args, scale=1.0)


def test_head_row_attention_rejects_non_bool_masks():
    q, k, v, present, visible = attention_case(1)
    with pytest.raises(ValueError, match="present"):
        head_row_attention(q, k, v, present.int(), visible, 1.0)


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
def test_pool_on_cuda_matches_the_cpu_pool():
    """The same program on a CUDA pool and a CPU pool leaves the same index and reads the same values."""
    pools = [make_pool(), HeadRowPool(L, H, S, R, DK, DV, torch.float32, device="cuda")]
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(3, H, DK, generator=gen), torch.randn(3, H, DV, generator=gen)
    drop = mask([True, False], [True, True], [False, True])
    for pool in pools:
        dev = pool.device
        pool.alloc(ids(4, 1, 6).to(dev))
        pool.write(1, ids(4, 1, 6).to(dev), k.to(dev), v.to(dev))
        assert pool.free_entries(1, ids(4, 1, 6).to(dev), drop.to(dev)) == 4
        assert pool.free_entries(ids(0, 0).to(dev), ids(1, 6).to(dev), mask([True, False], [False, True]).to(dev)) == 2
        with pytest.raises(ValueError, match="double free"):
            pool.free_entries(1, ids(1).to(dev), mask([True, False]).to(dev))
        assert pool.free_slots(ids(6).to(dev)) == 2
        pool.alloc(ids(2).to(dev))
        pool.check()
    cpu, gpu = pools
    assert torch.equal(gpu.row_of.cpu(), cpu.row_of)
    assert torch.equal(gpu.free_stack[:gpu.free_rows].cpu(), cpu.free_stack[:cpu.free_rows])
    assert torch.equal(gpu.live, cpu.live) and gpu.live.device.type == "cpu"
    slots = torch.arange(S + 1)
    got = [pool.gather(1, slots.to(pool.device)) for pool in pools]
    assert torch.equal(got[1][2].cpu(), got[0][2])
    present = got[0][2]
    assert torch.equal(got[1][0].cpu()[present], got[0][0][present])
    assert torch.equal(got[1][1].cpu()[present], got[0][1][present])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_head_row_attention_on_cuda_matches_cpu(dtype):
    q, k, v, present, visible = (t.to(dtype) if t.is_floating_point() else t for t in attention_case(4))
    k[~present] = float("nan")
    v[~present] = float("nan")
    out = head_row_attention(*(t.cuda() for t in (q, k, v, present, visible)), 0.3)
    assert out.device.type == "cuda" and out.dtype == dtype and not bool(out.isnan().any())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.cpu().double(), dense_attention(q, k, v, present, visible, 0.3), rtol=tol,
                               atol=tol)
