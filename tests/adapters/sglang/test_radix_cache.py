"""KVPolicyRadixCache on the real SGLang pools, allocator and RadixCache (CPU)."""

from __future__ import annotations

from array import array

import pytest
import torch

from tests.adapters.sglang.conftest import sglang_or_skip

sglang_or_skip()

from kvpolicy.adapters.sglang._internals import DUMMY_SLOT, EvictParams, MatchPrefixParams, RadixKey  # noqa: E402
from kvpolicy.adapters.sglang.cache import valid_prefix_length  # noqa: E402
from kvpolicy.adapters.sglang.layout import decode_positions, extend_positions  # noqa: E402


def prune(h, req, drop: list[int]):
    layout = h.cache.layout(req)
    positions = torch.arange(layout.logical_len)
    keep = torch.ones(layout.logical_len, dtype=torch.bool)
    keep[drop] = False
    # only judge tokens that are still present (a real selector judges each token once)
    present = layout.present
    return h.cache.prune(req, positions[present], keep[present])


def test_prune_after_prefill_frees_slots_and_compacts_row(harness_factory):
    h = harness_factory(window=4)
    req = h.start(list(range(100, 120)))
    before = h.allocator.available_size()
    row_before = h.cache.layout(req).physical_row().clone()
    result = prune(h, req, [1, 2, 5, 9])
    assert result.freed == 4 and result.tombstoned == 0 and result.dropped_shared == 0
    assert h.allocator.available_size() == before + 4
    layout = h.cache.layout(req)
    assert layout.logical_len == 20 and layout.physical_len == 16 and layout.pruned_count == 4
    expected_positions = [p for p in range(20) if p not in (1, 2, 5, 9)]
    assert layout.kept_positions().tolist() == expected_positions
    assert layout.physical_row().tolist() == row_before[expected_positions].tolist()
    h.audit()


def test_pruning_twice_raises_and_changes_nothing(harness_factory):
    h = harness_factory(window=4)
    req = h.start(list(range(10)))
    prune(h, req, [3])
    free_before = h.allocator.available_size()
    with pytest.raises(ValueError, match="already pruned"):
        h.cache.prune(req, torch.tensor([3, 4]), torch.tensor([False, False]))
    assert h.allocator.available_size() == free_before
    assert h.cache.layout(req).physical_len == 9
    h.audit()


def test_new_tokens_keep_original_absolute_positions(harness_factory):
    h = harness_factory(window=4)
    req = h.start(list(range(30)))
    prune(h, req, [0, 3, 4, 10, 11, 12])
    layout = h.cache.layout(req)
    assert layout.next_positions(3).tolist() == [30, 31, 32]
    assert h.decode(req, 7)
    layout = h.cache.layout(req)
    assert layout.kept_positions()[-1].item() == 30  # the decoded token sits at its logical position
    # SGLang's decode rule positions = seq_lens - 1 with the physical seq_len would say 24: wrong.
    physical_seq_len = torch.tensor([layout.physical_len + 1])  # including the next token
    assert (physical_seq_len - 1).item() == 25
    assert decode_positions(physical_seq_len, torch.tensor([layout.pruned_count])).item() == 31
    positions = extend_positions(torch.tensor([layout.physical_len, 5]), torch.tensor([2, 3]),
                                 torch.tensor([layout.pruned_count, 0]))
    assert positions.tolist() == [31, 32, 5, 6, 7]
    h.audit()


def test_compressed_prefix_is_served_after_pruning(harness_factory):
    h = harness_factory(window=4)
    prompt = list(range(200, 224))
    a = h.start(prompt)
    prune(h, a, [2, 3, 7, 15])  # all outside the last 4 tokens
    kept = h.cache.layout(a).physical_row().clone()
    h.finish(a)
    h.audit()
    # stock-facing match stops at the first tombstone: slots 1:1 with matched tokens
    stock = h.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", prompt + [1, 2]))))
    assert stock.device_indices.shape[0] == 2
    # the compressed match serves all 24 tokens with 20 slots
    b = h.start(prompt + [1, 2, 3])
    layout = h.cache.layout(b)
    assert layout.shared_len == 24 and layout.logical_len == 27 and layout.physical_len == 23
    assert layout.physical_row()[:20].tolist() == kept.tolist()
    assert layout.next_positions(1).item() == 27
    h.audit()


def test_prefix_whose_window_was_pruned_is_not_served_as_intact(harness_factory):
    h = harness_factory(window=4)
    prompt = list(range(300, 330))
    a = h.start(prompt)
    prune(h, a, [12, 20])
    h.finish(a)
    # B shares 22 tokens: its protected window [18, 22) contains the tombstone at 20 -> not valid there.
    key = RadixKey(array("q", prompt[:22] + [999]))
    match = h.cache.match_compressed(key)
    assert match.length == 20  # [16, 20) intact, 12 is older than the window
    assert int((match.slots == DUMMY_SLOT).sum()) == 1
    # B shares 25 tokens: [21, 25) is intact again, so all 25 are valid
    assert h.cache.match_compressed(RadixKey(array("q", prompt[:25] + [999]))).length == 25
    # B shares 14 tokens: window [10, 14) holds tombstone 12 -> back off to 12
    assert h.cache.match_compressed(RadixKey(array("q", prompt[:14] + [999]))).length == 12
    h.audit()


@pytest.mark.parametrize("window", [0, 1, 3, 8])
def test_valid_prefix_length_rule(window):
    values = torch.tensor([5, 0, 6, 7, 8, 0, 9, 10, 11, 12])
    for end in range(values.numel() + 1):
        m = valid_prefix_length(values[:end], window)
        assert 0 <= m <= end
        window_slice = values[max(0, m - window):m]
        assert not bool((window_slice == 0).any())
        for longer in range(m + 1, end + 1):  # m is the largest such length
            assert bool((values[max(0, longer - window):longer] == 0).any())


def test_node_split_through_pruned_region(harness_factory):
    h = harness_factory(window=2)
    prompt = list(range(400, 420))
    a = h.start(prompt)
    prune(h, a, [3, 4, 5, 6, 12])
    h.finish(a)
    total_before = h.cache.total_size()
    # B diverges at 8, inside the node, after the run of tombstones 3..6: [6, 8) = tombstone at 6 -> m = 6? No:
    # window 2 means [6, 8) must be intact; 6 is pruned, so the largest valid m <= 8 is 3 ([1, 3) intact).
    b = h.start(prompt[:8] + [1, 2, 3])
    layout = h.cache.layout(b)
    assert layout.shared_len == 3 and layout.pruned_count == 0
    assert h.cache.total_size() == total_before  # splits move values, never copy or lose them
    h.audit()
    # C diverges at 10: [8, 10) intact -> m = 10, with the 4 tombstones inside
    c = h.start(prompt[:10] + [5, 6])
    layout = h.cache.layout(c)
    assert layout.shared_len == 10 and layout.pruned_count == 4 and layout.physical_len == 8
    h.audit()
    for req in (b, c):
        h.finish(req)
    h.audit()


def test_eviction_counts_physical_slots_and_removes_tombstone_leaves(harness_factory):
    h = harness_factory(window=2)
    a = h.start(list(range(500, 516)))
    prune(h, a, list(range(0, 12)))
    h.finish(a)
    b = h.start(list(range(600, 610)))
    h.finish(b)
    sizes = h.cache.physical_sizes()
    assert sizes == (4 + 10, 0)
    assert h.cache.evictable_size() == 14  # physical slots, not the 26 logical tokens
    result = h.cache.evict(EvictParams(num_tokens=100))
    assert result.num_tokens_evicted == 14
    assert h.cache.total_size() == 0 and not h.cache.root_node.children
    assert h.allocator.available_size() == h.capacity
    h.audit()


def test_locked_prefix_is_not_evicted_and_counts_as_protected(harness_factory):
    h = harness_factory(window=2)
    a = h.start(list(range(20)))
    prune(h, a, [1, 2])
    h.finish(a)
    b = h.start(list(range(20)) + [50])
    assert h.cache.physical_sizes().protected == 18
    assert h.cache.evict(EvictParams(num_tokens=100)).num_tokens_evicted == 0
    h.audit()
    h.finish(b)
    h.audit()


def test_tree_held_token_is_freed_only_by_its_sole_holder(harness_factory):
    h = harness_factory(window=2)
    prompt = list(range(700, 716))
    a = h.start(prompt)
    h.finish(a)  # the whole prompt is now tree-held, intact
    b = h.start(prompt + [1])
    c = h.start(prompt + [2])
    # b and c both lock the prompt's node: b's pruning must not free a slot c reads
    shared = prune(h, b, [4])
    assert shared == (0, 0, 1)
    assert h.cache.layout(b).physical_len == 16 and h.cache.layout(c).physical_len == 17
    h.audit()
    h.finish(c)
    # now b is the only holder: pruning a tree-held token tombstones it in the tree and frees it
    sole = prune(h, b, [5])
    assert sole == (1, 1, 0)
    assert h.cache.match_compressed(RadixKey(array("q", prompt[:6]))).length == 5
    h.audit()
    h.finish(b)
    h.audit()


def test_batch_of_requests_with_different_pruning(harness_factory):
    h = harness_factory(window=3)
    reqs = [h.start(list(range(k * 100, k * 100 + n))) for k, n in ((1, 12), (2, 20), (3, 7))]
    drops = ([0, 1, 2], [], [4, 5, 6][:1])
    items = []
    for req, drop in zip(reqs, drops):
        layout = h.cache.layout(req)
        keep = torch.ones(layout.logical_len, dtype=torch.bool)
        keep[drop] = False
        items.append((req, torch.arange(layout.logical_len), keep))
    free_before = h.allocator.available_size()
    result = h.cache.prune_batch(items)
    assert result.freed == 4
    assert h.allocator.available_size() == free_before + 4
    assert [h.cache.layout(r).physical_len for r in reqs] == [9, 20, 6]
    h.audit()
    for i, req in enumerate(reqs):
        assert h.decode(req, 42 + i)
    h.audit()
    for req in reqs:
        h.finish(req)
    h.audit()


def test_cache_unfinished_req_with_pruned_layout(harness_factory):
    h = harness_factory(window=2)
    prompt = list(range(800, 812))
    a = h.start(prompt)
    prune(h, a, [1, 6])
    # What the scheduler sets before a chunk: get_fill_ids() = full_untruncated_fill_ids[:extend_range.end]
    a.full_untruncated_fill_ids = array("q", prompt)
    a.set_extend_range(0, len(prompt))
    h.cache.cache_unfinished_req(a)
    layout = h.cache.layout(a)
    assert layout.shared_len == 12 and layout.physical_len == 10
    assert a.kv.cache_protected_len == 12
    h.audit()
    h.finish(a)
    h.audit()
    assert h.cache.match_compressed(RadixKey(array("q", prompt))).length == 12


def test_untracked_requests_behave_like_stock_radix_cache(harness_factory):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    h = harness_factory(window=4)
    req = Req("plain", "", array("q", range(10)), SamplingParams())
    h.req_pool.alloc([req])
    slots = h.allocator.alloc(10)
    h.req_pool.write((req.kv.req_pool_idx, slice(0, 10)), slots.to(torch.int32))
    h.cache.cache_finished_req(req, kv_len_to_handle=10)
    h.req_pool.free(req)
    assert h.cache.total_size() == 10 and h.allocator.available_size() == h.capacity - 10
    h.audit()


def test_stock_request_heals_tombstones_and_keeps_a_one_to_one_row(harness_factory):
    h = harness_factory(window=2)
    prompt = list(range(900, 916))
    a = h.start(prompt)
    prune(h, a, [3, 4, 9])
    h.finish(a)
    assert h.cache.total_size() == 13
    # A stock (untracked) request only gets the intact part and computes the rest itself.
    b = h.start(prompt + [1, 2], track=False)
    assert b.kv.cache_protected_len == 3
    h.audit()
    # Chunked prefill of the stock request: its insert heals the 3 tombstones with its own slots,
    # so the tree's values over its key are all intact and its row stays 1:1 (stock code asserts that).
    b.full_untruncated_fill_ids = array("q", prompt + [1, 2])
    b.set_extend_range(0, 18)
    h.cache.cache_unfinished_req(b)
    assert b.kv.cache_protected_len == 18
    stock = h.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", prompt))))
    assert stock.device_indices.shape[0] == 16 and not bool((stock.device_indices == DUMMY_SLOT).any())
    h.audit()
    h.finish(b)
    h.audit()
    assert h.cache.total_size() == 18


def test_stock_finished_request_heals_tombstones(harness_factory):
    h = harness_factory(window=2)
    prompt = list(range(950, 962))
    a = h.start(prompt)
    prune(h, a, [0, 5])
    h.finish(a)
    b = h.start(prompt, track=False)
    assert b.kv.cache_protected_len == 0
    free_before = h.allocator.available_size()
    h.finish(b)
    # b's 12 slots: 2 healed tombstones (kept by the tree), 10 duplicates freed
    assert h.allocator.available_size() == free_before + 10
    assert h.cache.total_size() == 12
    h.audit()
