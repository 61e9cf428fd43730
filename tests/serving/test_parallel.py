"""Tensor and data parallelism with per-head eviction, on real SGLang servers (CPU, the shipped testbed model).

- ``--tp-size 2``: each rank holds 2 of the testbed's 4 KV heads, scores them (KVzap-MLP, the shipped surrogate)
  and frees its own entries; the ranks agree on admission, eviction and prefix matching
  (:mod:`kvpolicy.adapters.sglang.ranks`). Served one request at a time from an empty prefix cache, tp = 2 gives
  tp = 1's greedy tokens, and each rank frees exactly tp = 1's count for each of its heads. Then a concurrent
  burst with shared prefixes, chunked prefill and a pool small enough that the tree evicts leaves nothing held
  with SGLang's strict idle check on in both ranks' schedulers; ``kvpolicy bench-serve``'s measurement reports
  both ranks. Without a policy tp = 2 also answers like tp = 1.
- ``--dp-size 2``: two replicas, each with its own scheduler, pool and policy; ``bench-serve`` runs through it
  and reports the replicas one by one and summed.

Servers run in float32 (``--dtype float32``) so that the split matmuls of tp = 2 round like tp = 1's.
"""

from __future__ import annotations

import contextlib
import csv
import re
import sys
import time

import pytest

from tests.serving.conftest import sglang_or_skip

sglang_or_skip()

from kvpolicy.lab.serve_bench import (  # noqa: E402
    PolicyRun,
    Server,
    measure_ranks,
    parse_policy_run,
    run_bench,
    run_requests,
    suite_examples,
)
from kvpolicy.lab.testbed import MODEL_DIR, SURROGATES  # noqa: E402
from kvpolicy.lab.testbed.tasks import generate  # noqa: E402
from tests.serving.test_load_and_faults import _burst_workload, _wait_idle  # noqa: E402

POOL = 1024  # small enough that the burst makes the tree evict
SEED = 93  # not the evaluation seed
KVZAP = PolicyRun("kvzap_mlp", "kvzap_mlp", {"surrogate": str(SURROGATES["mlp"]), "threshold": -2.0, "window": 16})
EXTRA = ["--dtype", "float32", "--chunked-prefill-size", "96"]


def _prompts():
    examples = [generate(task, length, SEED, i) for task in ("single_needle", "multi_key", "variable_tracking")
                for length in (256, 512) for i in range(2)]
    return [e.prompt for e in examples], [len(e.answer) + 4 for e in examples]


def _one_at_a_time(server: Server, prompts, max_new):
    """Each prompt alone from an empty prefix cache: its output ids and every rank's log record."""
    outputs, records = [], []
    for prompt, new in zip(prompts, max_new):
        server.flush_cache()
        reply = run_requests(server, [prompt], [new], 1, timeout=120, ignore_eos=True)[0]
        assert reply.error is None, reply.error
        outputs.append(reply.output_ids)
        deadline = time.monotonic() + 10
        while True:  # every rank logs the request when it leaves its scheduler
            mine = [r for r in server.rank_records() if r.rid == reply.meta["id"]]
            if len(mine) == server.tp_size or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        records.append(sorted(mine, key=lambda r: r.tp_rank))
    return outputs, records


@contextlib.contextmanager
def _side_by_side(*servers: Server):
    """Launch the servers together (they load in parallel), wait for all, stop all at the end."""
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _clean_exit(server: Server) -> None:
    assert server.exit_code == 0, server.log_tail()
    log = server.log_text()
    assert "memory leak" not in log and "Scheduler hit an exception" not in log and "double free" not in log


@pytest.mark.slow
def test_tensor_parallel_per_head_eviction_equals_one_rank(tmp_path):
    prompts, max_new = _prompts()
    one, two = (Server(MODEL_DIR, KVZAP, tmp_path / f"tp{tp}.log", max_total_tokens=POOL, python=sys.executable,
                       extra_args=EXTRA, tp_size=tp) for tp in (1, 2))
    with _side_by_side(one, two):
        outputs1, records1 = _one_at_a_time(one, prompts, max_new)
        one.stop()
        outputs2, records2 = _one_at_a_time(two, prompts, max_new)
        _burst_and_bench_on_two_ranks(two)
    for server in (one, two):
        _clean_exit(server)

    assert outputs2 == outputs1
    assert sum(r[0].freed for r in records1) > 0.3 * sum(r[0].entries for r in records1)  # the policy prunes
    for one, two in zip(records1, records2):
        (whole,) = one
        assert whole.heads == (0, 1, 2, 3) and [r.heads for r in two] == [(0, 1), (2, 3)]
        for rank in two:  # each rank freed exactly what one rank freed for the same heads
            assert rank.freed_per_head == tuple(whole.freed_per_head[h] for h in rank.heads), (whole, rank)
            assert rank.entries * 2 == whole.entries and rank.freed == sum(rank.freed_per_head)


def _burst_and_bench_on_two_ranks(server: Server) -> None:
    """A concurrent burst with shared prefixes on the tp = 2 server (chunked prefill; the pool fills, so the tree
    evicts), nothing held afterwards with both ranks' strict idle checks on; then bench-serve's measurement."""
    prompts, max_new = _burst_workload()
    prompts, max_new = prompts[:24], max_new[:24]
    server.flush_cache()
    replies = run_requests(server, prompts, max_new, concurrency=24, timeout=300, deadline_s=300, ignore_eos=True)
    assert not [r.error for r in replies if r.error]
    assert [len(r.output_ids) for r in replies] == max_new
    load = _wait_idle(server, timeout=120)
    assert load["num_used_tokens"] == 0, load
    log = server.log_text()
    evictions = [int(m.group(1)) for m in re.finditer(r"agreement: \d+ forwards, \d+ agreements, (\d+) eviction", log)]
    assert evictions and max(evictions) > 0, "the tree never evicted: the eviction agreement was not exercised"
    assert "memory leak" not in log and "Scheduler hit an exception" not in log

    examples = suite_examples(["single_needle", "multi_key"], [256], 3)
    row, ranks = measure_ranks(server, examples, 6, timeout=120, deadline_s=300)
    assert row.tp_size == 2 and row.answered == row.requests == len(examples) and row.errors == 0
    assert [(r.replica, r.tp_rank, r.kv_heads) for r in ranks] == [(0, 0, "0,1"), (0, 1, "2,3")]
    assert all(r.requests == len(examples) and r.agreements and r.agreement_ms is not None for r in ranks)
    assert row.compression == pytest.approx(sum(r.freed for r in ranks) / sum(r.entries for r in ranks))
    assert row.agreement_ms is not None and row.agreement_ms > 0


@pytest.mark.slow
def test_tensor_parallel_without_a_policy_equals_one_rank(tmp_path):
    prompts, max_new = _prompts()
    servers = [Server(MODEL_DIR, PolicyRun("none"), tmp_path / f"none-tp{tp}.log", max_total_tokens=POOL,
                      python=sys.executable, extra_args=["--dtype", "float32"], tp_size=tp) for tp in (1, 2)]
    outputs = []
    with _side_by_side(*servers):
        for server in servers:
            replies = run_requests(server, prompts, max_new, concurrency=4, timeout=120, deadline_s=300,
                                   ignore_eos=True)
            assert not [r.error for r in replies if r.error]
            outputs.append([r.output_ids for r in replies])
            server.stop()
    for server in servers:
        _clean_exit(server)
    assert outputs[1] == outputs[0]


@pytest.mark.slow
def test_bench_serve_through_a_data_parallel_server(tmp_path):
    """Two replicas, each its own scheduler, pool and policy (the launcher's configuration reaches both through
    the environment): every request is answered and freed in one replica, the report sums them and lists both."""
    examples = suite_examples(["single_needle", "multi_key"], [256], 4)
    rows = run_bench(MODEL_DIR, [parse_policy_run("window:window=32")], examples, [8], tmp_path, max_total_tokens=POOL,
                     server_python=sys.executable, progress=False, timeout=120, deadline_s=300, dp_size=2)
    report = (tmp_path / "results.md").read_text()
    assert not any(line.startswith("- ") for line in report.splitlines()), report  # no failures listed
    (row,) = rows
    assert (row.dp_size, row.kv_pool, row.answered, row.errors) == (2, 2 * POOL, len(examples), 0)
    with open(tmp_path / "results_ranks.csv", newline="") as fh:
        ranks = list(csv.DictReader(fh))
    assert sorted(int(r["replica"]) for r in ranks) == [0, 1]  # both replicas served requests
    assert sum(int(r["requests"]) for r in ranks) == len(examples)
    freed, entries = sum(int(r["freed"]) for r in ranks), sum(int(r["entries"]) for r in ranks)
    assert row.compression == pytest.approx(freed / entries) and row.compression > 0.5  # 256 tokens, 32 kept
    assert "## Per rank" in report
    log = (tmp_path / "server-window_window=32.log").read_text()
    assert "rank dp0 tp0/1" in log and "rank dp1 tp0/1" in log


@pytest.mark.slow
def test_200_concurrent_requests_at_tp2_leave_both_ranks_idle(tmp_path):
    """200 concurrent requests (the burst's prompts, shared prefixes, 64-640 tokens) on a tp = 2 KVzap-MLP server
    with chunked prefill and a pool the tree must evict from: every request answered in full, both ranks logged
    every request, nothing held at idle with SGLang's strict idle check on in both ranks' schedulers (~2 min here)."""
    prompts, max_new = _burst_workload()
    prompts, max_new = (prompts * 5)[:200], (max_new * 5)[:200]
    server = Server(MODEL_DIR, KVZAP, tmp_path / "tp2-load.log", max_total_tokens=2048, python=sys.executable,
                    extra_args=["--chunked-prefill-size", "96"], tp_size=2)
    with server:
        replies = run_requests(server, prompts, max_new, concurrency=200, timeout=900, deadline_s=900,
                               ignore_eos=True)
        assert not [r.error for r in replies if r.error]
        assert [len(r.output_ids) for r in replies] == max_new
        load = _wait_idle(server, timeout=180)
        assert load["num_used_tokens"] == 0, load
        ids = {r.meta["id"] for r in replies}
        records = [r for r in server.rank_records() if r.rid in ids]
        assert sorted(r.tp_rank for r in records) == [0] * 200 + [1] * 200
        assert sum(r.freed for r in records) > 0
        evictions = [int(m.group(1)) for m in
                     re.finditer(r"agreement: \d+ forwards, \d+ agreements, (\d+) eviction", server.log_text())]
        assert evictions and max(evictions) > 0
    _clean_exit(server)
