"""A policy per request on one real SGLang server (CPU, the shipped testbed model and KVzap-MLP surrogate).

- Refusals over HTTP: a request that names a policy the server does not allow, a value outside the operator's
  limits, a field that cannot vary per request, or any choice on a server without ``--kv-policy-allow`` gets HTTP 400
  (an error event when streamed) with the reason, and the server keeps serving.
- Prefix reuse: each (policy, config) has its own radix-tree namespace, so a prompt cached under one policy is not
  reused by another, and is reused by the same one.
- Mixed traffic: no policy, window and KVzap-MLP interleaved on one server give each request the tokens and the
  freed entries its own one-policy server gives (one request at a time), every reply's ``meta_info`` names the policy
  it asked for, and under concurrency each policy's accuracy and compression match its own server's.

Servers run in float32 so that results do not depend on which requests share a batch.
"""

from __future__ import annotations

import json
import sys
import urllib.error

import pytest

from tests.serving.conftest import sglang_or_skip

sglang_or_skip()

from kvpolicy.lab.serve_bench import (  # noqa: E402
    PolicyRun,
    Server,
    measure_ranks,
    measure_shared,
    run_requests,
    served_policy,
    shared_server_run,
    stream_generate,
)
from kvpolicy.lab.testbed import MODEL_DIR, SURROGATES  # noqa: E402
from kvpolicy.lab.testbed.tasks import generate  # noqa: E402
from tests.serving.test_load_and_faults import _wait_idle  # noqa: E402

SEED = 93  # not the evaluation seed
KVZAP = {"surrogate": str(SURROGATES["mlp"]), "threshold": -2.0, "window": 16}
RUNS = [PolicyRun("none"), PolicyRun("window", "window", {"window": 16}), PolicyRun("kvzap_mlp", "kvzap_mlp", KVZAP)]
EXTRA = ["--dtype", "float32"]
POOL = 4096


def _examples():
    return [generate(task, length, SEED, i) for task in ("single_needle", "multi_key", "variable_tracking")
            for length in (256, 512) for i in range(2)]


def _post(server: Server, body: dict) -> tuple[int, dict]:
    try:
        return 200, json.loads(server.post_json("/generate", body, timeout=60))
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _body(prompt, custom_params=None, max_new_tokens=4):
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0}
    if custom_params is not None:
        sampling["custom_params"] = custom_params
    return {"input_ids": list(prompt), "sampling_params": sampling}


@pytest.mark.slow
def test_refusals_over_http_and_one_namespace_per_policy(tmp_path):
    allow = {"kvzap_mlp": {"limits": {"threshold": {"min": -6, "max": 0}}}, "window": {"config": {"window": 16}},
             "none": {}}
    run = PolicyRun("shared", "kvzap_mlp", KVZAP, allow=json.dumps(allow))
    prompt = list(range(5, 133))
    with Server(MODEL_DIR, run, tmp_path / "shared.log", max_total_tokens=POOL, python=sys.executable,
                extra_args=EXTRA) as server:
        refused = {
            "snapkv": ({"kv_policy": "snapkv"}, "policy 'snapkv' is not allowed on this server (allowed: kvzap_mlp, "
                                                "window, none)"),
            "oracle": ({"kv_policy": "kvzip_plus"}, "policy 'kvzip_plus' is not allowed"),
            "range": ({"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": 2}},
                      "kvzap_mlp: threshold=2 is outside this server's limit (threshold in [-6, 0])"),
            "field": ({"kv_policy": "window", "kv_policy_config": {"window": 64}},
                      "window: field 'window' cannot be set per request on this server (settable: none)"),
            "type": ({"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": "-3"}}, "must be a number"),
            "orphan": ({"kv_policy_config": {"threshold": -3}}, "needs custom_params.kv_policy"),
        }
        for case, (params, reason) in refused.items():
            status, reply = _post(server, _body(prompt, params))
            assert status == 400, (case, status, reply)
            assert reason in reply["error"]["message"], (case, reply)
        streamed = stream_generate(server.url, prompt, 4, custom_params={"kv_policy": "snapkv"})
        assert "not allowed on this server" in (streamed.error or "") and "400" in streamed.error

        # The server keeps serving; each (policy, config) is its own prefix namespace.
        served = {}
        for label, params in (("kvzap", None), ("window", {"kv_policy": "window"}), ("none", {"kv_policy": "none"}),
                              ("none again", {"kv_policy": "none"}),
                              ("kvzap -4", {"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": -4}}),
                              ("kvzap explicit", {"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": -2}})):
            status, reply = _post(server, _body(prompt, params))
            assert status == 200, (label, reply)
            served[label] = reply["meta_info"]
        assert [served[k]["cached_tokens"] for k in ("kvzap", "window", "none", "kvzap -4")] == [0, 0, 0, 0]
        assert served["none again"]["cached_tokens"] == len(prompt) - 1  # the unpruned prompt, reused whole
        reports = {label: meta["kvpolicy"][0] for label, meta in served.items()}
        # The server's default config named explicitly shares its namespace (a pruned prefix obeys the window rule).
        assert reports["kvzap explicit"]["namespace"] == reports["kvzap"]["namespace"]
        assert reports["kvzap -4"]["namespace"] != reports["kvzap"]["namespace"]
        assert reports["window"]["policy"] == "window" and reports["window"]["config"]["window"] == 16
        assert reports["none"] == {**reports["none"], "policy": "none", "rows_freed": 0, "compression": 0.0}
        assert reports["kvzap -4"]["config"]["threshold"] == -4.0
        assert reports["kvzap -4"]["rows_freed"] < reports["kvzap"]["rows_freed"]  # a lower threshold frees less
        for report in reports.values():
            assert report["kv_heads"] == [0, 1, 2, 3] and len(report["compression_per_head"]) == 4
            assert report["rows_freed"] <= report["entries"]
        assert _wait_idle(server)["num_used_tokens"] == 0
    assert server.exit_code == 0, server.log_tail()
    assert "memory leak" not in server.log_text()


@pytest.mark.slow
def test_a_server_without_an_allowlist_refuses_a_request_that_chooses(tmp_path):
    run = PolicyRun("window", "window", {"window": 16})
    with Server(MODEL_DIR, run, tmp_path / "one.log", max_total_tokens=POOL, python=sys.executable) as server:
        status, reply = _post(server, _body(range(5, 69), {"kv_policy": "window"}))
        assert status == 400 and "serves one policy ('window')" in reply["error"]["message"], reply
        status, reply = _post(server, _body(range(5, 69)))
        assert status == 200 and reply["meta_info"]["kvpolicy"][0]["policy"] == "window"
    assert server.exit_code == 0, server.log_tail()


@pytest.mark.slow
def test_mixed_traffic_matches_one_server_per_policy(tmp_path):
    examples = _examples()
    prompts, max_new = [e.prompt for e in examples], [len(e.answer) + 4 for e in examples]
    own, own_rows = {}, {}
    for run in RUNS:
        with Server(MODEL_DIR, run, tmp_path / f"own-{run.label}.log", max_total_tokens=POOL, python=sys.executable,
                    extra_args=EXTRA) as server:
            replies = run_requests(server, prompts, max_new, 1, timeout=120, ignore_eos=True)
            assert all(r.error is None for r in replies), [r.error for r in replies]
            freed = server.pruning_log()
            own[run.label] = [(r.output_ids, freed.get(r.meta["id"], (0,))[0], r.meta["cached_tokens"])
                              for r in replies]
            server.flush_cache()
            own_rows[run.label] = measure_ranks(server, examples, 6, timeout=120)[0]
        assert server.exit_code == 0, server.log_tail()

    server_run, params = shared_server_run(RUNS)
    with Server(MODEL_DIR, server_run, tmp_path / "shared.log", max_total_tokens=POOL, python=sys.executable,
                extra_args=EXTRA) as server:
        order = [(i, j) for i in range(len(examples)) for j in range(len(RUNS))]  # interleaved, one at a time
        replies = run_requests(server, [prompts[i] for i, _ in order], [max_new[i] for i, _ in order], 1,
                               timeout=120, ignore_eos=True, custom_params=[params[j] for _, j in order])
        freed = server.pruning_log()
        for (i, j), reply in zip(order, replies):
            run = RUNS[j]
            assert reply.error is None, reply.error
            assert served_policy(reply) == (run.policy or "none")
            report = reply.meta["kvpolicy"][0]
            # The same prefix reuse as alone: the same prompt under another policy is not reused.
            assert (reply.output_ids, report["rows_freed"], reply.meta["cached_tokens"]) == own[run.label][i], \
                (run.label, i)
            assert freed[reply.meta["id"]][0] == report["rows_freed"]
        server.flush_cache()
        rows, _ = measure_shared(server, RUNS, params, examples, 6, timeout=120)
        assert _wait_idle(server)["num_used_tokens"] == 0
    assert server.exit_code == 0, server.log_tail()
    assert "memory leak" not in server.log_text()

    shared = {row.policy: row for row in rows}
    total = shared.pop("all (shared server)")
    assert total.requests == len(RUNS) * len(examples) and total.errors == 0
    for run in RUNS:
        row, alone = shared[run.label], own_rows[run.label]
        assert row.errors == 0 and row.server == "shared" and row.served_as_asked == len(examples)
        assert abs(row.accuracy - alone.accuracy) <= 1 / len(examples), (run.label, row.accuracy, alone.accuracy)
        if run.policy is None:
            assert row.compression == 0.0 and alone.compression is None  # own: plain SGLang, nothing logged
        else:
            assert abs(row.compression - alone.compression) <= 0.01, (run.label, row.compression, alone.compression)
