"""RaggedStore: segments hold exactly the kept entries in order, across prefill blocks and decoding appends."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.ragged import RaggedStore


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.lists(st.integers(1, 6), min_size=1, max_size=8),
       st.integers(0, 2**31 - 1))
def test_segments_match_a_list_model(batch, heads, dim, blocks, seed):
    gen = torch.Generator().manual_seed(seed)
    store = RaggedStore.empty(batch * heads, dim, torch.float32, "cpu", backend="torch")
    expected = [[] for _ in range(batch * heads)]
    for n in blocks:
        keys = torch.randn((batch, heads, n, dim), generator=gen)
        values = torch.randn((batch, heads, n, dim), generator=gen)
        keep = torch.rand((batch, heads, n), generator=gen) < 0.6
        store.extend(keys, values, keep)
        for s in range(batch * heads):
            b, h = divmod(s, heads)
            expected[s].extend((keys[b, h, t], values[b, h, t]) for t in range(n) if keep[b, h, t])
    assert store.entries == sum(len(e) for e in expected)
    assert bool((store.lengths <= store.capacities).all())
    for s, entries in enumerate(expected):
        k, v = store.segment(s)
        assert k.shape[0] == len(entries)
        if entries:
            assert torch.equal(k, torch.stack([e[0] for e in entries]))
            assert torch.equal(v, torch.stack([e[1] for e in entries]))


def test_prefill_block_has_no_spare_capacity_and_appends_amortise():
    store = RaggedStore.empty(2, 4, torch.float32, "cpu")
    keep = torch.tensor([[[True] * 40, [True] * 10 + [False] * 30]])
    store.extend(torch.randn(1, 2, 40, 4), torch.randn(1, 2, 40, 4), keep)
    assert store.capacities.tolist() == [40, 10] and store.key_buf.shape[0] == 50
    reallocations = 0
    for _ in range(64):
        before = store.key_buf.data_ptr()
        store.extend(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.ones(1, 2, 1, dtype=torch.bool))
        reallocations += store.key_buf.data_ptr() != before
    assert store.lengths.tolist() == [104, 74]
    assert reallocations <= 4  # growth by >= 16 rows / 1/8, not one row at a time


def test_tail_is_read_and_removed_without_copying_the_store():
    """``read_tail``/``remove_tail``: the last entries of every segment, oldest first; removing them leaves the
    rest in place and makes their rows spare rows."""
    store = RaggedStore.empty(2, 3, torch.float32, "cpu")
    keys, values = torch.randn(1, 2, 6, 3), torch.randn(1, 2, 6, 3)
    keep = torch.tensor([[[True] * 6, [True, False, True, True, False, True]]])
    store.extend(keys, values, keep)
    tail_k, tail_v = store.read_tail(2)
    assert torch.equal(tail_k, torch.stack([keys[0, 0, 4:], keys[0, 1, [3, 5]]]))
    assert torch.equal(tail_v, torch.stack([values[0, 0, 4:], values[0, 1, [3, 5]]]))
    buffer, spare = store.key_buf, store.spare
    removed_k, removed_v = store.remove_tail(2)
    assert torch.equal(removed_k, tail_k) and torch.equal(removed_v, tail_v)
    assert store.lengths.tolist() == [4, 2] and store.key_buf is buffer and store.spare == spare + 2
    assert torch.equal(store.segment(1)[0], keys[0, 1, [0, 2]])
    assert store.read_tail(0)[0].shape == (2, 0, 3)
    store.append_one(torch.ones(2, 3), torch.ones(2, 3), None)  # into a freed row, no regrow
    assert store.key_buf is buffer and store.lengths.tolist() == [5, 3]
