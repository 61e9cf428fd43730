"""Tensor-parallel pieces of the SGLang adapter that need no SGLang: which KV heads a rank holds, and the
agreement of a TP group's ranks (:mod:`kvpolicy.adapters.sglang.ranks`).

The agreement is exercised over a real ``torch.distributed`` gloo group of two processes (what SGLang's TP CPU
group is on this machine); the lower-bound rules between agreements are checked as a property.
"""

from __future__ import annotations

import multiprocessing
import traceback

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.adapters.sglang.ranks import BROKEN_INLINE, KVHeadShard, RowTotals, TPRowAgreement

# -- which heads a rank holds ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("tp_rank", "tp_size", "total", "heads", "replicas"), [
    (0, 1, 4, (0, 1, 2, 3), 1),
    (0, 2, 4, (0, 1), 1),
    (1, 2, 4, (2, 3), 1),
    (3, 4, 8, (6, 7), 1),
    (0, 4, 2, (0,), 2),  # more ranks than heads: each head on tp_size // heads consecutive ranks
    (1, 4, 2, (0,), 2),
    (2, 4, 2, (1,), 2),
    (7, 8, 1, (0,), 8),
], ids=lambda v: str(v))
def test_kv_head_shard_follows_sglangs_qkv_sharding(tp_rank, tp_size, total, heads, replicas):
    shard = KVHeadShard.of(tp_rank, tp_size, total)
    assert (shard.heads, shard.replicas, shard.local_heads) == (heads, replicas, len(heads))


def test_the_ranks_cover_every_head_exactly_once_or_replicas_times():
    for total, tp in ((4, 2), (8, 4), (2, 4), (4, 4), (3, 3), (1, 2)):
        held = [h for r in range(tp) for h in KVHeadShard.of(r, tp, total).heads]
        assert sorted(set(held)) == list(range(total))
        assert all(held.count(h) == max(1, tp // total) for h in range(total))


@pytest.mark.parametrize(("tp_rank", "tp_size", "total"), [(0, 3, 4), (0, 3, 2), (2, 2, 4), (0, 0, 4), (0, 2, 0)])
def test_kv_head_shard_refuses_layouts_that_do_not_divide(tp_rank, tp_size, total):
    with pytest.raises(ValueError):
        KVHeadShard.of(tp_rank, tp_size, total)


def test_own_scores_keeps_the_ranks_heads():
    scores = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # (B, every KV head, T)
    rank1 = KVHeadShard.of(1, 2, 4)
    assert torch.equal(rank1.own_scores(scores), scores[:, 2:4])
    local = scores[:, :2]  # a policy that scored this rank's keys returns its heads already
    assert rank1.own_scores(local) is local
    assert torch.equal(KVHeadShard.of(3, 4, 2).own_scores(scores[:, :2]), scores[:, 1:2])
    with pytest.raises(ValueError, match="scores for 3 KV heads"):
        rank1.own_scores(scores[:, :3])
    assert rank1.label() == "tp1/2 kv heads 2,3"


# -- the lower bounds between agreements ----------------------------------------------------------------------

PER = 6  # rows per slot of the simulated pool


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "lock", "unlock", "free", "prune", "sync"]),
                          st.integers(0, 5), st.lists(st.integers(0, 30), min_size=2, max_size=2)),
                max_size=40))
def test_the_agreed_totals_never_exceed_any_ranks_own(events):
    """Two ranks' (F, E, P) rows under the events every rank sees (the same allocations and locks; frees and
    pruning that differ per rank): the totals between agreements stay at or below the MIN over the ranks, and an
    agreement makes them exact."""
    start = [10 * PER, 0, 0]
    ranks = [list(start), list(start)]
    agreement = TPRowAgreement(None, size=2, num_rows=10 * PER, num_slots=20)

    def true_min() -> RowTotals:
        return RowTotals(*(min(values) for values in zip(*([f, f + e, f + e + p] for f, e, p in ranks))))

    for kind, n, amounts in events:
        if kind == "alloc":  # n slots taken from every rank's free rows (running requests hold them)
            if any(f < n * PER for f, _, _ in ranks) or agreement.free_rows(0) < n * PER:
                continue
            for rank in ranks:
                rank[0] -= n * PER
            agreement.on_alloc(torch.arange(1, n + 1), n * PER)
        elif kind == "lock":  # nodes of n slots get locked: each rank moves what it holds of them, <= n * PER
            moved = [min(e, a, n * PER) for (_, e, _), a in zip(ranks, amounts)]
            for rank, m in zip(ranks, moved):
                rank[1] -= m
                rank[2] += m
            agreement.on_lock(n * PER)
        elif kind == "unlock":
            for rank, a in zip(ranks, amounts):
                m = min(rank[2], a)
                rank[2] -= m
                rank[1] += m
            agreement.moved()
        elif kind == "free":  # a request's rows go back (different amounts per rank)
            for rank, a in zip(ranks, amounts):
                rank[0] += a
            agreement.moved()
        elif kind == "prune":  # the policy frees rows of tree nodes
            for rank, a in zip(ranks, amounts):
                m = min(rank[2], a)
                rank[2] -= m
                rank[0] += m
        else:  # what sync() computes from the gathered table
            agreement.view = true_min()
        view, low = agreement.totals(RowTotals(0, 0, 0)), true_min()
        assert all(v <= t for v, t in zip(view, low)), (kind, view, low)
        assert view.free <= view.free_or_evictable <= view.free_or_cached


# -- the agreement over a real gloo group ---------------------------------------------------------------------


def _rank_main(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        agreement = TPRowAgreement(dist.group.WORLD, size=2, num_rows=600, num_slots=1000)
        out = {}
        # 1. different local totals, one rank freed and one failed, a few broken slots each
        agreement.note_broken(torch.tensor([3, 4] if rank == 0 else [4, 9]))
        local = RowTotals(500, 540, 590) if rank == 0 else RowTotals(520, 530, 600)
        outcome = agreement.sync(lambda: local, 40 + rank, freed_since=rank, failures={} if rank == 0 else
                                 {"req-b": "policy 'x' returned NaN scores (layer 1)"})
        out["view"] = tuple(agreement.view)
        out["freed_entries"] = agreement.freed_entries(999)
        out["outcome"] = (outcome.freed, outcome.failures)
        out["broken"] = torch.nonzero(agreement.broken).flatten().tolist()
        out["intact"] = agreement.intact(torch.tensor([3, 5, 9]), torch.tensor([False, False, False])).tolist()
        # 2. more broken slots than fit inline on one rank: the rest in one more gather
        many = torch.arange(100, 100 + BROKEN_INLINE + 37) if rank == 1 else torch.tensor([50])
        agreement.note_broken(many)
        agreement.sync(lambda: local, 0, 0, {})
        out["many"] = int(agreement.broken[100:100 + BROKEN_INLINE + 37].sum()), bool(agreement.broken[50])
        # 3. an allocation makes its slots intact again; the eviction count is the largest
        agreement.on_alloc(torch.tensor([4, 9]), 12)
        out["after_alloc"] = (tuple(agreement.view), agreement.broken[[4, 9]].tolist(), agreement.pending)
        out["max"] = agreement.agree_max(3 if rank == 0 else 7)
        out["stats"] = (agreement.stats.agreements, agreement.stats.evictions, agreement.stats.gathers)
        results.put((rank, out))
        dist.destroy_process_group()
    except Exception:  # report instead of hanging the other rank's test
        results.put((rank, traceback.format_exc()))


def test_two_ranks_agree_over_gloo(tmp_path):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    init_file = str(tmp_path / "gloo-init")
    procs = [context.Process(target=_rank_main, args=(rank, init_file, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        got = dict(results.get(timeout=120) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    for rank, out in got.items():
        assert isinstance(out, dict), f"rank {rank} failed:\n{out}"
    first, second = got[0], got[1]
    assert first == second  # every rank agreed on the same numbers, flags, failures and slots
    assert first["view"] == (500, 530, 590)  # element-wise MIN of the two ranks' totals
    assert first["freed_entries"] == 40
    assert first["outcome"] == (True, {"req-b": "policy 'x' returned NaN scores (layer 1)"})
    assert first["broken"] == [3, 4, 9] and first["intact"] == [False, True, False]
    assert first["many"] == (BROKEN_INLINE + 37, True)
    assert first["after_alloc"] == ((488, 518, 578), [False, False], True)
    assert first["max"] == 7
    assert first["stats"] == (2, 1, 2)  # 2 agreements, 1 eviction; gathers: the failures, the overflow
