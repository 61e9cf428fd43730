"""Pure parts of :mod:`kvpolicy.lab.serve_bench` (no server): run specs, the log line it parses, and the launcher
command lines it builds, checked against the launcher's own validation (and SGLang's parser where installed)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from kvpolicy.adapters.sglang.config import CONFIG_ENV, AdapterConfigError, SGLangPolicyConfig, parse_policy_flags
from kvpolicy.lab.serve_bench import (
    AGREEMENT_LINE,
    PRUNED_LINE,
    RANK_COLUMNS,
    PolicyRun,
    RankRecord,
    Server,
    check_runs,
    cpu_thread_binding,
    merge_ranks,
    parse_policy_run,
    parse_policy_runs,
    parse_rank_records,
    percentile,
    rank_rows,
    shared_server_run,
    write_outputs,
)
from kvpolicy.lab.specs import SpecError
from kvpolicy.lab.testbed import MODEL_DIR, SURROGATES

LAUNCHER = "kvpolicy.adapters.sglang.launch"


@pytest.fixture(autouse=True)
def _no_policy_in_env(monkeypatch):
    # apply_launch_flags writes os.environ; setenv first so that monkeypatch also undoes a variable it creates.
    monkeypatch.setenv(CONFIG_ENV, "")
    monkeypatch.delenv(CONFIG_ENV)


def test_parse_policy_run():
    """bench-serve reads the lab's one spec grammar (kvpolicy.lab.specs): NAME[:key=value,...], 'none'."""
    assert parse_policy_run("none") == PolicyRun("none")
    run = parse_policy_run("window:window=64")
    assert (run.policy, run.config, run.label) == ("window", {"window": 64}, "window window=64")
    run = parse_policy_run("kvzap_mlp:surrogate=/x,threshold=-4")
    assert run.label == "kvzap_mlp threshold=-4" and run.config == {"surrogate": "/x", "threshold": -4}
    assert (run.granularity, run.token_vote, run.min_keep_fraction) == (None, None, None)
    with pytest.raises(SpecError, match="takes no configuration"):
        parse_policy_run("none:window=1")
    with pytest.raises(SpecError, match="is not key=value"):
        parse_policy_run('window:{"window": 64}')  # the old NAME:JSON form is refused, not misread
    with pytest.raises(SpecError, match="sweeps 2 configurations"):
        parse_policy_run("window:window=32|64")
    # "full" is no longer a name for no policy: it is looked up like any other name (and is unknown).
    assert parse_policy_run("full") == PolicyRun("full", "full", {})


def test_parse_policy_runs_expands_sweeps():
    runs = parse_policy_runs(["none", "window:window=32|64,sinks=0|4"])
    assert [r.label for r in runs] == ["none", "window window=32,sinks=0", "window window=32,sinks=4",
                                       "window window=64,sinks=0", "window window=64,sinks=4"]
    assert runs[0].policy is None and runs[2].config == {"window": 32, "sinks": 4}


def test_check_runs_finds_what_the_launcher_would_refuse():
    runs = [parse_policy_run("none"), parse_policy_run("window:window=64"),
            PolicyRun("kvzap", "kvzap_mlp", {"surrogate": str(SURROGATES["mlp"]), "threshold": -4})]
    assert check_runs(runs, MODEL_DIR) == []
    bad = [parse_policy_run("window:ratio=0.5"), parse_policy_run("no_such_policy"),
           parse_policy_run('window:threshold="-4"'), parse_policy_run("snapkv:threshold=0")]
    problems = check_runs([*runs, *bad], MODEL_DIR)
    assert len(problems) == 4, problems
    assert "threshold selection only (got ratio)" in problems[0]
    assert "unknown policy 'no_such_policy'" in problems[1]
    assert "expected a number, got the string '-4'" in problems[2]
    assert "needs queries" in problems[3]


@pytest.mark.parametrize("q, expected", [(0, 1.0), (50, 2.0), (90, 4.0), (99, 4.0), (100, 4.0)], ids=str)
def test_percentile_nearest_rank(q, expected):
    assert percentile([4.0, 1.0, 3.0, 2.0], q) == expected
    assert percentile([], q) is None


# -- the adapter's per-request log line -----------------------------------------------------------------------


def test_pruned_line_matches_the_adapter_log_format():
    line = ("[2026-11-23 07:08:51] kvpolicy: request 5a5c6b finished: 156 of 188 entries freed; policy compression "
            "0.8298")
    m = PRUNED_LINE.search(line)
    assert m is not None and m.groups() == ("5a5c6b", "156", "188", "0.8298", *[None] * 5)  # no rank tag (older)
    tagged = line + "; rank dp1 tp0/2 kv heads 0,1; freed per head 80,76"
    m = PRUNED_LINE.search(tagged)
    assert m is not None and m.groups() == ("5a5c6b", "156", "188", "0.8298", "1", "0", "2", "0,1", "80,76")
    # The 0.5.19 adapter's token line and a retracted request (prefilled again later) are not results.
    assert PRUNED_LINE.search("kvpolicy: request 5a5c6b finished: 39 of 47 tokens pruned; policy compression "
                              "0.830") is None
    assert PRUNED_LINE.search("kvpolicy: request 5a5c6b retracted: 3 of 40 entries freed; policy compression "
                              "0.075") is None


def test_pruned_line_matches_what_the_row_controller_logs(caplog):
    """The line :meth:`RowController.on_release` really logs (the controller built without a model: only the
    state the log line reads)."""
    from collections import OrderedDict

    import torch

    from kvpolicy.adapters.sglang.live import RowController
    from kvpolicy.adapters.sglang.ranks import KVHeadShard
    from kvpolicy.adapters.sglang.requests import Choice
    from kvpolicy.policies.window import WindowConfig

    controller = object.__new__(RowController)
    report = SimpleNamespace(compression=0.75)
    controller.num_layers, controller.num_heads = 3, 2
    controller.shard = KVHeadShard.of(1, 2, 4)
    controller.rank_label = f"dp1 {controller.shard.label()}"  # what the constructor sets
    controller._choices, controller.reports = {}, OrderedDict()
    choice = Choice("window", WindowConfig(window=8), "kvpolicy:window:x")
    controller.requests = {"r1": SimpleNamespace(next_position=[17, 17, 17], first=7, freed=45,
                                                 freed_per_head=torch.tensor([20, 25]), choice=choice,
                                                 selector=SimpleNamespace(report=lambda: report))}
    with caplog.at_level(logging.INFO, logger="kvpolicy.adapters.sglang.live"):
        controller.on_release(SimpleNamespace(rid="r1", finished=lambda: True))
    m = PRUNED_LINE.search(caplog.text)
    assert m is not None and m.groups() == ("r1", "45", str(10 * 3 * 2), "0.7500", "1", "1", "2", "2,3", "20,25")
    assert caplog.text.rstrip().endswith("freed per head 20,25; policy window")
    assert parse_rank_records(caplog.text) == [RankRecord("r1", 45, 60, 0.75, 1, 1, 2, (2, 3), (20, 25))]
    # The finished request's meta_info report: this rank's heads, 10 tokens x 3 layers of entries per head.
    assert controller.take_report("r1") == {
        "policy": "window", "config": {"threshold": 0.0, "window": 8, "sinks": 0}, "namespace": "kvpolicy:window:x",
        "entries": 60, "rows_freed": 45, "compression": 0.75, "policy_compression": 0.75, "kv_heads": [2, 3],
        "compression_per_head": [20 / 30, 25 / 30], "tp_size": 2}
    assert controller.take_report("r1") is None


def test_pruning_log_reads_the_server_log(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("[t] kvpolicy: request a finished: 1 of 8 entries freed; policy compression 0.1250\n"
                   "[t] something else\n"
                   "[t] kvpolicy: request b finished: 0 of 4 entries freed; policy compression 0.0000\n")
    assert Server(MODEL_DIR, PolicyRun("w", "window"), log, port=1).pruning_log() == {
        "a": (1, 8, 0.125), "b": (0, 4, 0.0)}


def test_pruning_log_sums_the_tensor_parallel_ranks(tmp_path):
    """Each TP rank logs its own heads' entries; a request's totals sum the ranks, a head replicated on several
    ranks counts once, and its compression is weighted by entries."""
    log = tmp_path / "server.log"
    line = "[t TP{r}] kvpolicy: request {rid} finished: {f} of {e} entries freed; policy compression {c}; rank dp0 " \
           "tp{r}/{n} kv heads {h}; freed per head {p}\n"
    log.write_text(line.format(r=0, n=2, rid="a", f=30, e=60, c="0.5000", h="0,1", p="10,20")
                   + line.format(r=1, n=2, rid="a", f=15, e=60, c="0.2500", h="2,3", p="5,10")
                   # 4 ranks over 2 heads: ranks 0, 1 hold head 0, ranks 2, 3 head 1
                   + "".join(line.format(r=r, n=4, rid="b", f=f, e=40, c=c, h=h, p=f)
                             for r, f, c, h in ((0, 8, "0.2000", "0"), (1, 8, "0.2000", "0"),
                                                (2, 4, "0.1000", "1"), (3, 4, "0.1000", "1"))))
    server = Server(MODEL_DIR, PolicyRun("w", "window"), log, port=1, tp_size=2)
    assert server.pruning_log() == {"a": (45, 120, pytest.approx(0.375)), "b": (12, 80, pytest.approx(0.15))}
    records = server.rank_records()
    assert [(r.rid, r.tp_rank, r.heads, r.freed_per_head) for r in records[:2]] == [
        ("a", 0, (0, 1), (10, 20)), ("a", 1, (2, 3), (5, 10))]
    assert merge_ranks(records[:1]) == {"a": (30, 60, 0.5)}


def test_agreement_log_keeps_each_ranks_last_summary(tmp_path):
    log = tmp_path / "server.log"
    summary = "[t] kvpolicy: rank dp{d} tp{r}/2 kv heads {h} agreement: {f} forwards, {a} agreements, {e} eviction " \
              "agreements, {g} gathers; mean 0.500 ms, max 2.000 ms, total {t} ms\n"
    log.write_text(summary.format(d=0, r=0, h="0,1", f=8, a=10, e=1, g=0, t="5.5")
                   + summary.format(d=0, r=1, h="2,3", f=8, a=10, e=1, g=0, t="6.0")
                   + summary.format(d=0, r=0, h="0,1", f=25, a=30, e=2, g=1, t="17.0"))
    assert Server(MODEL_DIR, PolicyRun("w", "window"), log, port=1).agreement_log() == {
        (0, 0): (25, 33, 17.0), (0, 1): (8, 11, 6.0)}
    from kvpolicy.adapters.sglang.ranks import AgreementStats

    stats = AgreementStats(forwards=8, agreements=10, evictions=1, seconds=0.0055)  # what the ranks really log
    m = AGREEMENT_LINE.search(f"kvpolicy: rank dp0 tp0/2 kv heads 0,1 agreement: {stats.summary()}")
    assert m is not None and (m.group(4), m.group(5), m.group(6), m.group(8)) == ("8", "10", "1", "5.5")


def test_parallel_servers_get_their_flags_and_a_core_per_rank(tmp_path, monkeypatch):
    server = Server(MODEL_DIR, PolicyRun("w", "window"), tmp_path / "s.log", port=1, tp_size=2, dp_size=3)
    command = server.command()
    assert command[command.index("--tp-size") + 1] == "2" and command[command.index("--dp-size") + 1] == "3"
    assert "--tp-size" not in Server(MODEL_DIR, PolicyRun("none"), tmp_path / "s.log", port=1).command()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cpu_thread_binding(6) == "0|1|0|1|0|1" and cpu_thread_binding(1) == "0"
    with pytest.raises(ValueError, match="tp_size and dp_size"):
        Server(MODEL_DIR, PolicyRun("none"), tmp_path / "s.log", port=1, tp_size=0)


def test_rank_rows_and_the_per_rank_report(tmp_path):
    records = [RankRecord("a", 30, 60, 0.5, 0, 0, 2, (0, 1), (10, 20)),
               RankRecord("a", 15, 60, 0.25, 0, 1, 2, (2, 3), (5, 10)),
               RankRecord("b", 10, 20, 0.5, 1, 0, 2, (0, 1), (4, 6))]
    sampler = SimpleNamespace(replicas={0: [(100, 2), (300, 4)], 1: [(50, 1)]})
    rows = rank_rows(None, "kvzap", 8, records, sampler, {(0, 0): (4, 5, 1.0)},
                     {(0, 0): (8, 15, 6.0), (0, 1): (5, 9, 4.5)})
    assert [(r.replica, r.tp_rank, r.kv_heads, r.requests, r.entries, r.freed, r.kv_used_peak, r.max_running,
             r.forwards, r.agreements, r.agreement_ms, r.agreement_ms_per_forward) for r in rows] == [
        (0, 0, "0,1", 1, 60, 30, 300, 4, 4, 10, 0.5, 1.25), (0, 1, "2,3", 1, 60, 15, 300, 4, 5, 9, 0.5, 0.9),
        (1, 0, "0,1", 1, 20, 10, 50, 1, None, None, None, None)]
    assert rows[0].compression == 0.5
    paths = write_outputs([], tmp_path, ranks=rows)
    text = (tmp_path / "results.md").read_text()
    assert "## Per rank" in text and "| kvzap | 8 | 1 | 0 | 0,1 |" in text
    assert (tmp_path / "results_ranks.csv").read_text().splitlines()[0] == ",".join(RANK_COLUMNS)
    assert "ranks_csv" in paths


# -- granularity and vote ---------------------------------------------------------------------------------


def _window() -> PolicyRun:
    return parse_policy_run("window:window=64")


@pytest.mark.parametrize(
    "args, label, flags",
    [
        (("head",), "window window=64 head", ["--kv-granularity", "head"]),
        (("token",), "window window=64 token vote=any", ["--kv-granularity", "token"]),
        (("token", "fraction", 0.5), "window window=64 token vote=fraction(0.5)",
         ["--kv-granularity", "token", "--kv-token-vote", "fraction", "--kv-min-keep-fraction", "0.5"]),
        ((None, "fraction", 0.5), "window window=64 token vote=fraction(0.5)",  # a vote implies token
         ["--kv-granularity", "token", "--kv-token-vote", "fraction", "--kv-min-keep-fraction", "0.5"]),
        ((None, "any"), "window window=64 token vote=any", ["--kv-granularity", "token", "--kv-token-vote", "any"]),
    ],
    ids=["head", "token", "token-fraction", "vote-implies-token", "any-vote-implies-token"],
)
def test_with_granularity_label_and_launcher_flags(args, label, flags):
    run = _window().with_granularity(*args)
    assert run.label == label and (run.policy, run.config) == ("window", {"window": 64})
    assert run.launcher_flags() == ["--kv-policy", "window", "--kv-policy-config", '{"window": 64}', *flags]


def test_with_granularity_leaves_plain_runs_alone():
    assert _window().with_granularity(None) == _window()
    assert _window().launcher_flags() == ["--kv-policy", "window", "--kv-policy-config", '{"window": 64}']
    none = parse_policy_run("none")
    for args in ((None,), ("token",), ("token", "fraction", 0.5), (None, "fraction")):
        assert none.with_granularity(*args) == none


_COMBINATIONS = [
    pytest.param(granularity, vote, fraction, id=f"{granularity}-{vote}-{fraction}")
    for granularity in (None, "head", "token") for vote in (None, "any", "fraction") for fraction in (None, 0.25)
]


@pytest.mark.parametrize("granularity, vote, fraction", _COMBINATIONS)
def test_with_granularity_gives_runs_the_launcher_accepts(granularity, vote, fraction):
    """Whatever ``bench-serve --kv-granularity/--kv-token-vote/--kv-min-keep-fraction`` passes: either refused
    up front (ValueError) or a run whose flags the launcher's own validation accepts."""
    from kvpolicy.adapters.sglang.launch import build_launch

    try:
        run = _window().with_granularity(granularity, vote, fraction)
    except ValueError:
        return
    try:
        plan = build_launch(run.launcher_flags())
    except AdapterConfigError as exc:
        pytest.fail(f"{run.label!r}: the launcher refuses {run.launcher_flags()}: {exc}")
    assert plan.config.granularity.value == run.granularity or (run.granularity is None
                                                                and plan.config.granularity.value == "head")


# -- the server command line --------------------------------------------------------------------------------


RUNS = {
    "plain": _window(),
    "head": _window().with_granularity("head"),
    "token-any": _window().with_granularity("token"),
    "token-fraction": _window().with_granularity("token", "fraction", 0.5),
    "kvzap": PolicyRun("kvzap", "kvzap_mlp", {"surrogate": str(SURROGATES["mlp"]), "threshold": -4.0}),
}


def _launcher_args(run: PolicyRun, tmp_path) -> list[str]:
    argv = Server(MODEL_DIR, run, tmp_path / "server.log", port=30000).command()
    assert argv[1:3] == ["-m", LAUNCHER]
    return argv[3:]


@pytest.mark.parametrize("run", RUNS.values(), ids=RUNS.keys())
def test_server_command_is_accepted_by_the_launcher(run, tmp_path):
    from kvpolicy.adapters.sglang.launch import _parser, build_launch

    args = _launcher_args(run, tmp_path)
    ours, _ = _parser().parse_known_args(args)
    config = parse_policy_flags(ours.kv_policy, ours.kv_policy_config, granularity=ours.kv_granularity,
                                token_vote=ours.kv_token_vote, min_keep_fraction=ours.kv_min_keep_fraction,
                                slot_expansion=ours.kv_slot_expansion)
    expected = {"policy": run.policy, "policy_config": run.config}
    expected.update({name: value for name in ("granularity", "token_vote", "min_keep_fraction")
                     if (value := getattr(run, name)) is not None})
    assert config == SGLangPolicyConfig(**expected)
    plan = build_launch(args)  # also the model-dependent checks, against the bundled model's config.json
    assert plan.config == config and json.loads(plan.env[CONFIG_ENV])["policy"] == run.policy
    assert not any(arg.startswith("--kv-") for arg in plan.sglang_argv if arg != "--kv-cache-dtype")


def test_server_command_for_no_policy_is_plain_sglang(tmp_path):
    argv = Server(MODEL_DIR, parse_policy_run("none"), tmp_path / "server.log", port=30000).command()
    assert argv[1:4] == ["-m", "sglang.launch_server", "--disable-overlap-schedule"]
    assert not any(arg.startswith("--kv-policy") for arg in argv)


@pytest.fixture
def prepare_server_args():
    from tests.adapters.sglang.conftest import root_logging_restored, sglang_or_skip

    sglang_or_skip()
    from sglang.srt.server_args import prepare_server_args

    with root_logging_restored():
        yield prepare_server_args


@pytest.mark.parametrize("run", [*RUNS.values(), parse_policy_run("none")], ids=[*RUNS.keys(), "none"])
def test_server_command_passes_sglangs_parser_and_the_refusals(prepare_server_args, run, tmp_path):

    from kvpolicy.adapters.sglang.launch import build_launch, refusals

    argv = Server(MODEL_DIR, run, tmp_path / "server.log", port=30000).command()
    if run.policy is None:
        args = prepare_server_args(argv[3:])
        assert args.disable_overlap_schedule is True  # the scheduler the kvpolicy runs get
        return
    plan = build_launch(argv[3:])
    args = prepare_server_args(plan.sglang_argv)
    assert refusals(args) == []
    assert (args.max_total_tokens, args.port, args.skip_tokenizer_init) == (4096, 30000, True)


def test_bench_serve_cli_hands_the_parallel_sizes_to_every_server(tmp_path, monkeypatch):
    from kvpolicy.lab import cli, serve_bench

    seen = {}

    def fake_run_bench(model, runs, examples, concurrencies, out, **kwargs):
        seen.update(kwargs, runs=[r.label for r in runs])
        return []

    monkeypatch.setattr(serve_bench, "run_bench", fake_run_bench)
    assert cli.main(["bench-serve", "--policy", "none", "--tp-size", "2", "--dp-size", "3", "-n", "1",
                     "--out", str(tmp_path / "out")]) == 0
    assert (seen["tp_size"], seen["dp_size"], seen["runs"]) == (2, 3, ["none"])
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["bench-serve", "--tp-size", "0", "--out", str(tmp_path / "other")])
    assert excinfo.value.code == 2


def test_shared_server_allows_exactly_what_the_runs_ask_for():
    surrogate = str(SURROGATES["mlp"])
    runs = [PolicyRun("none"), parse_policy_run("window:window=16"),
            PolicyRun("kvzap a", "kvzap_mlp", {"surrogate": surrogate, "threshold": -2.0}),
            PolicyRun("kvzap b", "kvzap_mlp", {"surrogate": surrogate, "threshold": -4.0, "window": 32})]
    server, params = shared_server_run(runs)
    assert (server.policy, server.config) == ("window", {})  # the first run with a policy is the default
    assert json.loads(server.allow) == {
        "window": {"limits": {"window": {"one_of": [16]}}},
        "kvzap_mlp": {"config": {"surrogate": surrogate},
                      "limits": {"threshold": {"one_of": [-4.0, -2.0]}, "window": {"one_of": [32]}}},
        "none": {}}
    assert params == [{"kv_policy": "none"}, {"kv_policy": "window", "kv_policy_config": {"window": 16}},
                      {"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": -2.0}},
                      {"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": -4.0, "window": 32}}]
    # The launcher accepts that server, and its allowlist resolves every run's request to the run's config.
    assert check_runs([server], MODEL_DIR) == []
    flags = server.launcher_flags()
    config = parse_policy_flags(flags[1], flags[3], allow=flags[flags.index("--kv-policy-allow") + 1])
    choices = config.request_policies()
    resolved = [choices.resolve(p) for p in params]
    assert [c.policy for c in resolved] == ["none", "window", "kvzap_mlp", "kvzap_mlp"]
    assert [(c.config.threshold, c.config.window) for c in resolved[2:]] == [(-2.0, 128), (-4.0, 32)]
    assert len({c.namespace for c in resolved}) == 4


@pytest.mark.parametrize("runs, message", [
    ([PolicyRun("none")], "at least one policy other than none"),
    ([PolicyRun("a", "kvzap_mlp", {"surrogate": "x"}), PolicyRun("b", "kvzap_mlp", {"surrogate": "y"})],
     "the runs of kvzap_mlp differ in surrogate"),
    ([PolicyRun("a", "window"), PolicyRun("a", "window", {"window": 4})], "same label"),
])
def test_shared_server_refuses_runs_it_cannot_share(runs, message):
    with pytest.raises(ValueError, match=message):
        shared_server_run(runs)
