"""SGLang 0.5.23's classic radix cache over the head-row pool: telescoped sizes, row-aware eviction, the window
rule for matching pruned prefixes, and a random program over all of them."""

from __future__ import annotations

from tests.adapters.sglang.conftest import sglang_or_skip

sglang_or_skip()

from array import array  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey  # noqa: E402

from kvpolicy.adapters.sglang.row_tree import HeadRowRadixCache, RowSizes, whole_prefix_length  # noqa: E402
from tests.adapters.sglang.conftest import (  # noqa: E402
    KV_HEADS,
    LAYERS,
    build_world,
    free_slots,
    locked_slots,
    tree_nodes,
    tree_slots,
)


def key(tokens) -> RadixKey:
    return RadixKey(array("q", tokens))


def insert_fresh(world, tokens) -> torch.Tensor:
    """Allocate a slot per token and insert them all (tokens the tree does not hold yet)."""
    slots = world.alloc.alloc(len(tokens))
    assert slots is not None
    result = world.cache.insert(InsertParams(key=key(tokens), value=slots.clone()))
    assert result.prefix_len == 0, "insert_fresh is for token sequences the tree does not hold"
    return slots


def match(world, tokens):
    return world.cache.match_prefix(MatchPrefixParams(key=key(tokens)))


def prune(world, slots: torch.Tensor, layer: int = 1, heads=(0,)) -> None:
    """The policy drops ``heads`` of ``layer`` of every slot in ``slots``."""
    drop = torch.zeros(slots.numel(), KV_HEADS, dtype=torch.bool)
    drop[:, list(heads)] = True
    world.alloc.free_entries(layer, slots, drop)


def size_total(world) -> int:
    s = world.cache.row_sizes()
    return s.available + s.evictable + s.protected


def brute_whole_prefix_length(intact: list[bool], window: int) -> int:
    """The definition: the largest m whose ``window`` tokens before m are all intact (m = 0 always is)."""
    return max(m for m in range(len(intact) + 1) if all(intact[max(0, m - window):m]))


# ---------------------------------------------------------------------------------------------------- sizes

def test_sizes_after_an_insert(world):
    insert_fresh(world, range(1, 11))
    # 92 rows, 46 slots; the tree holds 10 whole slots (40 rows): 52 free rows -> 13 tokens available
    assert world.cache.row_sizes() == RowSizes(available=13, evictable=10, protected=0, evictable_rows=40,
                                               protected_rows=0)
    assert world.cache.evictable_size() == 10 and world.cache.protected_size() == 0
    assert size_total(world) == world.plan.tokens


def test_pruning_a_tokens_worth_of_rows_moves_one_token_from_evictable_to_available(world):
    slots = insert_fresh(world, range(1, 11))
    prune(world, slots[:3])  # 3 rows: not yet a whole token's worth
    assert world.cache.row_sizes()[:3] == (13, 10, 0)
    prune(world, slots[3:4])  # the 4th row
    assert world.cache.row_sizes() == RowSizes(14, 9, 0, 36, 0)
    assert size_total(world) == world.plan.tokens


def test_locking_a_matched_prefix_moves_it_to_protected_and_unlocking_moves_it_back(world):
    insert_fresh(world, range(1, 11))
    node = match(world, range(1, 7)).last_device_node
    world.cache.inc_lock_ref(node)
    assert world.cache.row_sizes() == RowSizes(13, 4, 6, 16, 24)
    world.cache.dec_lock_ref(node)
    assert world.cache.row_sizes() == RowSizes(13, 10, 0, 40, 0)


def test_sizes_add_up_to_the_planned_tokens_through_a_session(world):
    cache, alloc, tokens = world.cache, world.alloc, world.plan.tokens
    a = insert_fresh(world, [1, 2, 3, 4, 5])
    assert size_total(world) == tokens
    b_tail = alloc.alloc(3)
    result = cache.insert(InsertParams(key=key([1, 2, 3, 7, 8, 9]), value=torch.cat([a[:3], b_tail])))
    assert result.prefix_len == 3
    assert size_total(world) == tokens
    prune(world, a, layer=0, heads=(0, 1))
    prune(world, b_tail[:1], layer=1, heads=(1,))
    assert size_total(world) == tokens
    node = match(world, [1, 2, 3, 7]).last_device_node
    cache.inc_lock_ref(node)
    assert size_total(world) == tokens
    cache.evict(EvictParams(num_tokens=2))
    assert size_total(world) == tokens
    cache.dec_lock_ref(node)
    assert size_total(world) == tokens
    cache.evict(EvictParams(num_tokens=100))
    assert cache.row_sizes() == RowSizes(tokens, 0, 0, 0, 0)
    assert alloc.rows.free_rows == world.plan.rows and free_slots(alloc).numel() == world.plan.slots


# ------------------------------------------------------------------------------------------------- eviction

def test_evict_frees_least_recently_used_leaves_until_available_grew_by_the_amount_asked(world):
    cache, alloc = world.cache, world.alloc
    a = insert_fresh(world, [1, 1, 1, 1, 1])
    b = insert_fresh(world, [2, 2, 2, 2, 2])
    c = insert_fresh(world, [3, 3, 3, 3, 3])
    assert alloc.available_size() == 8

    assert cache.evict(EvictParams(num_tokens=1)).num_tokens_evicted == 5  # A only: the oldest leaf
    assert alloc.available_size() == 13
    assert sorted(tree_slots(cache).tolist()) == sorted(torch.cat([b, c]).tolist())
    assert alloc.rows.live[a].tolist() == [0] * 5

    match(world, [2, 2])  # touch B: C is now the oldest
    assert cache.evict(EvictParams(num_tokens=5)).num_tokens_evicted == 5
    assert sorted(tree_slots(cache).tolist()) == sorted(b.tolist())

    assert cache.evict(EvictParams(num_tokens=0)).num_tokens_evicted == 0
    assert tree_slots(cache).numel() == 5


def test_evict_counts_the_rows_a_pruned_leaf_gives_back_not_its_slots(world):
    cache, alloc = world.cache, world.alloc
    a = insert_fresh(world, range(1, 11))  # the older leaf
    insert_fresh(world, range(20, 33))  # 13 more tokens: every row is held now
    assert alloc.available_size() == 0 and alloc.rows.free_rows == 0
    prune(world, a, layer=0, heads=(0, 1))
    prune(world, a, layer=1, heads=(0,))  # A keeps 1 row per slot: 30 rows came back
    assert alloc.available_size() == 7

    # Evicting A gives 10 slots but only 10 rows: available 10, short of 7 + 4. Counting slots would stop here.
    evicted = cache.evict(EvictParams(num_tokens=4))
    assert alloc.available_size() >= 11
    assert evicted.num_tokens_evicted == 23 and tree_slots(cache).numel() == 0


def test_evict_never_touches_locked_nodes(world):
    cache, alloc = world.cache, world.alloc
    a = insert_fresh(world, [1, 2, 3, 4, 5, 6])
    b_tail = alloc.alloc(3)
    cache.insert(InsertParams(key=key([1, 2, 3, 7, 8, 9]), value=torch.cat([a[:3], b_tail])))
    prune(world, a[1:2], layer=0, heads=(1,))  # outside the window: the match below is served whole
    found = match(world, [1, 2, 3, 4, 5, 6])
    assert found.device_prefix_len == 6
    node = found.last_device_node
    cache.inc_lock_ref(node)
    live_before = alloc.rows.live[a].clone()
    before = cache.row_sizes()

    result = cache.evict(EvictParams(num_tokens=100))
    assert result.num_tokens_evicted == 3  # only B's tail was unlocked
    assert sorted(tree_slots(cache).tolist()) == sorted(a.tolist())
    assert torch.equal(alloc.rows.live[a], live_before)
    assert torch.equal(cache.path_device_indices(node), a)
    after = cache.row_sizes()
    assert after.evictable == 0 and after.protected == before.protected
    assert after.available == before.available + before.evictable


# ------------------------------------------------------------------------------------------------- matching

WINDOW_CASES = [
    # (window, pruned position of the cached 10 tokens 1..10, query, expected served length)
    pytest.param(2, None, list(range(1, 11)), 10, id="intact-full-match"),
    pytest.param(2, 8, list(range(1, 11)), 8, id="prune-near-end-shortens-to-before-it"),
    pytest.param(2, 9, list(range(1, 11)), 9, id="prune-last-token"),
    pytest.param(2, 7, list(range(1, 11)), 10, id="prune-just-outside-window"),
    pytest.param(2, 2, list(range(1, 11)), 10, id="prune-far-before-end"),
    pytest.param(0, 8, list(range(1, 11)), 10, id="window-0-serves-everything"),
    pytest.param(2, 8, list(range(1, 7)), 6, id="query-ends-before-the-prune"),
    pytest.param(2, 8, list(range(1, 11)) + [99, 98], 8, id="query-longer-than-cache"),
    pytest.param(4, 8, list(range(1, 11)), 8, id="window-4"),
    pytest.param(20, 0, list(range(1, 11)), 0, id="window-longer-than-match-with-first-token-pruned"),
    pytest.param(20, 9, list(range(1, 11)), 9, id="window-longer-than-match-with-last-token-pruned"),
]


@pytest.mark.parametrize("window,pruned,query,expected", WINDOW_CASES)
def test_match_prefix_serves_only_a_prefix_whose_window_is_intact(window, pruned, query, expected):
    world = build_world(window=window)
    slots = insert_fresh(world, range(1, 11))
    if pruned is not None:
        prune(world, slots[pruned:pruned + 1], layer=1, heads=(0,))
    result = match(world, query)
    assert result.device_prefix_len == expected
    assert torch.equal(world.cache.path_device_indices(result.last_device_node), slots[:expected])
    if expected == 0:
        assert result.last_device_node is world.cache.root_node
    assert sorted(tree_slots(world.cache).tolist()) == sorted(slots.tolist())  # matching only splits nodes


def test_locking_a_shortened_match_protects_exactly_the_served_prefix(world):
    cache = world.cache
    slots = insert_fresh(world, range(1, 11))
    prune(world, slots[8:9], layer=1, heads=(0,))
    result = match(world, range(1, 11))
    assert result.device_prefix_len == 8
    cache.inc_lock_ref(result.last_device_node)
    assert sorted(locked_slots(cache).tolist()) == sorted(slots[:8].tolist())
    # 8 locked whole slots (32 rows); 2 unlocked slots hold 7 rows; 53 free rows
    assert cache.row_sizes() == RowSizes(13, 2, 8, 7, 32)
    assert cache.evict(EvictParams(num_tokens=100)).num_tokens_evicted == 2
    assert sorted(tree_slots(cache).tolist()) == sorted(slots[:8].tolist())


WHOLE_CASES = [
    pytest.param([], 2, 0, id="empty"),
    pytest.param([True] * 5, 2, 5, id="all-intact"),
    pytest.param([True, True, True, False, True], 2, 3, id="second-last-broken"),
    pytest.param([True, True, True, True, False], 2, 4, id="last-broken"),
    pytest.param([False, True, True, True, True], 2, 5, id="first-broken-window-2"),
    pytest.param([False, True, True, True, True], 5, 0, id="first-broken-window-5"),
    pytest.param([True, False, True, True, True], 3, 5, id="window-3-just-clear"),
    pytest.param([True, False, True, False, True], 2, 1, id="two-breaks"),
    pytest.param([False, False], 0, 2, id="window-0"),
    pytest.param([True, False], 1, 1, id="window-1"),
]


@pytest.mark.parametrize("intact,window,expected", WHOLE_CASES)
def test_whole_prefix_length_examples(intact, window, expected):
    assert whole_prefix_length(torch.tensor(intact, dtype=torch.bool), window) == expected


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(st.lists(st.booleans(), max_size=24), st.integers(0, 30))
def test_whole_prefix_length_matches_its_definition(intact, window):
    assert whole_prefix_length(torch.tensor(intact, dtype=torch.bool), window) == brute_whole_prefix_length(
        intact, window)


# ----------------------------------------------------------------------------------------- construction

class RecordingController:
    def __init__(self) -> None:
        self.released = []

    def on_release(self, req) -> None:
        self.released.append(req)


def test_on_release_forwards_the_request_to_the_controller():
    controller = RecordingController()
    world = build_world(controller=controller)
    req = object()
    world.cache.on_release(req, checkpointed=True)
    world.cache.on_release(req, checkpointed=False)
    assert controller.released == [req, req]
    build_world().cache.on_release(req, checkpointed=True)  # no controller: nothing to forward, no error


def test_construction_refuses_a_stock_allocator_a_page_size_and_a_negative_window(world):
    stock = TokenToKVPoolAllocator(world.plan.slots, torch.float32, "cpu", world.kv, False)
    with pytest.raises(TypeError, match="head-row allocator"):
        HeadRowRadixCache(CacheInitParams(disable=False, req_to_token_pool=world.req_pool,
                                          token_to_kv_pool_allocator=stock, page_size=1), window=2)
    with pytest.raises(ValueError, match="page size 1"):
        HeadRowRadixCache(CacheInitParams(disable=False, req_to_token_pool=world.req_pool,
                                          token_to_kv_pool_allocator=world.alloc, page_size=2), window=2)
    with pytest.raises(ValueError, match="window"):
        HeadRowRadixCache(CacheInitParams(disable=False, req_to_token_pool=world.req_pool,
                                          token_to_kv_pool_allocator=world.alloc, page_size=1), window=-1)


# ------------------------------------------------------------------------------------------ random program

def path_tokens(node) -> list[int]:
    """The token ids on the path from the root to ``node``."""
    parts = []
    while node.parent is not None:
        parts.append(list(node.key.token_ids))
        node = node.parent
    return [token for part in reversed(parts) for token in part]


class TreeProgram(RuleBasedStateMachine):
    """Requests come (match, lock, allocate, insert, free the duplicates, unlock, as the scheduler does), the
    policy prunes entries of cached slots, prefixes are locked and unlocked, the tree is evicted.

    Between steps no request owns slots, so every slot is free or in the tree and the sizes must add up to the
    planned tokens exactly."""

    slot_expansion = 2
    window = 2

    def __init__(self) -> None:
        super().__init__()
        self.world = build_world(slot_expansion=self.slot_expansion, window=self.window)
        self.locks: list = []  # one entry per inc_lock_ref this program holds

    def draw_tokens(self, data) -> list[int]:
        """Fresh tokens from a small vocabulary, or (half the time) a cached sequence cut anywhere and extended,
        as a follow-up turn would be."""
        fresh = st.lists(st.integers(1, 4), min_size=1, max_size=12)
        leaves = [node for node in tree_nodes(self.world.cache) if not node.children]
        if not leaves or data.draw(st.booleans()):
            return data.draw(fresh)
        cached = path_tokens(data.draw(st.sampled_from(leaves)))
        cut = data.draw(st.integers(1, len(cached)))
        return cached[:cut] + data.draw(st.lists(st.integers(1, 4), max_size=6))

    @rule(data=st.data())
    def request(self, data):
        cache, alloc = self.world.cache, self.world.alloc
        tokens = self.draw_tokens(data)
        found = match(self.world, tokens)
        node, matched = found.last_device_node, found.device_prefix_len
        cache.inc_lock_ref(node)
        prefix = cache.path_device_indices(node).to(torch.int64)
        assert prefix.numel() == matched
        need = len(tokens) - matched
        slots = alloc.alloc(need)
        if slots is None:  # what evict_to_free_tokens does before an alloc
            cache.evict(EvictParams(num_tokens=need - alloc.available_size()))
            slots = alloc.alloc(need)
        if slots is not None:
            assert torch.equal(cache.path_device_indices(node).to(torch.int64), prefix), "eviction took a lock"
            value = torch.cat([prefix, slots])
            result = cache.insert(InsertParams(key=key(tokens), value=value))
            assert result.prefix_len >= matched
            alloc.free(value[matched:result.prefix_len])  # the request's copies of tokens the tree already held
        cache.dec_lock_ref(node)

    @precondition(lambda self: tree_slots(self.world.cache).numel() > 0)
    @rule(data=st.data())
    def prune(self, data):
        """The policy drops random entries of up to 8 cached slots, in every layer at once."""
        alloc = self.world.alloc
        candidates = sorted(tree_slots(self.world.cache).tolist())
        chosen = torch.tensor(data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=8, unique=True)))
        n = chosen.numel()
        layers = torch.arange(LAYERS).repeat_interleave(n)  # one (layer, slot) pair per row of drop
        slots = chosen.repeat(LAYERS)
        wanted = data.draw(st.lists(st.booleans(), min_size=n * LAYERS * KV_HEADS, max_size=n * LAYERS * KV_HEADS))
        present = alloc.rows.row_of[layers, slots] != 0
        drop = torch.tensor(wanted).view(n * LAYERS, KV_HEADS) & present  # never an entry already gone
        free_before = alloc.rows.free_rows
        assert alloc.free_entries(layers, slots, drop) == int(drop.sum())
        assert alloc.rows.free_rows == free_before + int(drop.sum())

    @rule(data=st.data())
    def lock(self, data):
        cache, rows = self.world.cache, self.world.alloc.rows
        tokens = self.draw_tokens(data)
        raw = RadixCache.match_prefix(cache, MatchPrefixParams(key=key(tokens)))  # no window rule
        raw_slots = cache.path_device_indices(raw.last_device_node).to(torch.int64)
        intact = (rows.live[raw_slots] == rows.rows_per_slot).tolist()
        expected = brute_whole_prefix_length(intact, self.window)
        found = match(self.world, tokens)
        assert found.device_prefix_len == expected
        assert torch.equal(cache.path_device_indices(found.last_device_node).to(torch.int64), raw_slots[:expected])
        if expected:
            cache.inc_lock_ref(found.last_device_node)
            self.locks.append(found.last_device_node)

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data):
        node = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.world.cache.dec_lock_ref(node)

    @rule(n=st.integers(0, 10))
    def evict(self, n):
        cache, live = self.world.cache, self.world.alloc.rows.live
        before = cache.row_sizes()
        locked = [(node, node.value.clone(), live[node.value].clone()) for node in tree_nodes(cache)
                  if node.lock_ref > 0]
        held_slots = tree_slots(cache).numel()

        result = cache.evict(EvictParams(num_tokens=n))

        after = cache.row_sizes()
        grown = after.available - before.available
        assert grown >= min(n, before.evictable)
        if grown < n:  # stopped short only because nothing unlocked was left
            assert all(node.lock_ref > 0 for node in tree_nodes(cache))
        assert after.protected == before.protected and after.protected_rows == before.protected_rows
        assert result.num_tokens_evicted == held_slots - tree_slots(cache).numel()
        present = set(map(id, tree_nodes(cache)))
        for node, value, node_live in locked:
            assert id(node) in present and torch.equal(node.value, value)
            assert torch.equal(live[value], node_live)

    @precondition(lambda self: tree_slots(self.world.cache).numel() >= 8)  # let the tree grow first
    @rule()
    def release_everything(self):
        cache, alloc, plan = self.world.cache, self.world.alloc, self.world.plan
        for node in self.locks:
            cache.dec_lock_ref(node)
        self.locks.clear()
        cache.evict(EvictParams(num_tokens=plan.slots))
        assert tree_nodes(cache) == []
        assert cache.row_sizes() == RowSizes(plan.tokens, 0, 0, 0, 0)
        assert alloc.rows.free_rows == plan.rows and free_slots(alloc).numel() == plan.slots

    @invariant()
    def every_row_has_one_owner(self):
        self.world.alloc.rows.check()
        assert self.world.alloc.verify_byte_accounting() == []

    @invariant()
    def every_slot_is_free_or_in_the_tree_once(self):
        everything = torch.cat([tree_slots(self.world.cache), free_slots(self.world.alloc)])
        assert torch.equal(torch.sort(everything).values, torch.arange(1, self.world.plan.slots + 1))

    @invariant()
    def held_rows_are_the_tree_slots_live_rows(self):
        rows, cache = self.world.alloc.rows, self.world.cache
        assert rows.held_rows == int(rows.live[tree_slots(cache)].sum())
        s = cache.row_sizes()
        assert s.evictable_rows + s.protected_rows == rows.held_rows
        assert s.protected_rows == int(rows.live[locked_slots(cache)].sum())

    @invariant()
    def sizes_add_up_to_the_planned_tokens(self):
        s = self.world.cache.row_sizes()
        assert min(s) >= 0
        assert s.available + s.evictable + s.protected == self.world.plan.tokens
        assert s.available == self.world.alloc.available_size()
        assert (self.world.cache.evictable_size(), self.world.cache.protected_size()) == (s.evictable, s.protected)

    @invariant()
    def held_locks_are_on_live_nodes(self):
        for node in self.locks:
            assert node.lock_ref > 0 and not node.evicted


PROGRAM_SETTINGS = settings(max_examples=50, stateful_step_count=40, derandomize=True, deadline=None,
                            database=None)


class SlotBoundTreeProgram(TreeProgram):
    slot_expansion = 1  # as many slots as tokens: pruning frees rows, slots run out first


class WideWindowTreeProgram(TreeProgram):
    window = 5


TestTreeProgramRowBound = TreeProgram.TestCase
TestTreeProgramRowBound.settings = PROGRAM_SETTINGS
TestTreeProgramSlotBound = SlotBoundTreeProgram.TestCase
TestTreeProgramSlotBound.settings = PROGRAM_SETTINGS
TestTreeProgramWideWindow = WideWindowTreeProgram.TestCase
TestTreeProgramWideWindow.settings = PROGRAM_SETTINGS
