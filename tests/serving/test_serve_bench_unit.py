"""Pure parts of :mod:`kvpolicy.lab.serve_bench` (no server): run specs, the log line it parses, and the launcher
command lines it builds, checked against the launcher's own validation (and SGLang's parser where installed)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from kvpolicy.adapters.sglang.config import CONFIG_ENV, AdapterConfigError, SGLangPolicyConfig, parse_policy_flags
from kvpolicy.lab.serve_bench import PRUNED_LINE, PolicyRun, Server, parse_policy_run, percentile
from kvpolicy.lab.testbed import MODEL_DIR, SURROGATES

LAUNCHER = "kvpolicy.adapters.sglang.launch"


@pytest.fixture(autouse=True)
def _no_policy_in_env(monkeypatch):
    # apply_launch_flags writes os.environ; setenv first so that monkeypatch also undoes a variable it creates.
    monkeypatch.setenv(CONFIG_ENV, "")
    monkeypatch.delenv(CONFIG_ENV)


def test_parse_policy_run():
    assert parse_policy_run("none") == PolicyRun("none") == parse_policy_run("full")
    run = parse_policy_run('window:{"window": 64}')
    assert (run.policy, run.config, run.label) == ("window", {"window": 64}, "window window=64")
    run = parse_policy_run('kvzap_mlp:{"surrogate": "/x", "threshold": -4}')
    assert run.label == "kvzap_mlp threshold=-4" and run.config["surrogate"] == "/x"
    assert (run.granularity, run.token_vote, run.min_keep_fraction) == (None, None, None)
    with pytest.raises(ValueError, match="takes no config"):
        parse_policy_run('none:{"a": 1}')
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_policy_run("window:[1]")


@pytest.mark.parametrize("q, expected", [(0, 1.0), (50, 2.0), (90, 4.0), (99, 4.0), (100, 4.0)], ids=str)
def test_percentile_nearest_rank(q, expected):
    assert percentile([4.0, 1.0, 3.0, 2.0], q) == expected
    assert percentile([], q) is None


# -- the adapter's per-request log line -----------------------------------------------------------------------


def test_pruned_line_matches_the_adapter_log_format():
    line = ("[2026-11-23 07:08:51] kvpolicy: request 5a5c6b finished: 156 of 188 entries freed; policy compression "
            "0.8298")
    m = PRUNED_LINE.search(line)
    assert m is not None and m.groups() == ("5a5c6b", "156", "188", "0.8298")
    # The 0.5.19 adapter's token line and a retracted request (prefilled again later) are not results.
    assert PRUNED_LINE.search("kvpolicy: request 5a5c6b finished: 39 of 47 tokens pruned; policy compression "
                              "0.830") is None
    assert PRUNED_LINE.search("kvpolicy: request 5a5c6b retracted: 3 of 40 entries freed; policy compression "
                              "0.075") is None


def test_pruned_line_matches_what_the_row_controller_logs(caplog):
    """The line :meth:`RowController.on_release` really logs (the controller built without a model: only the
    state the log line reads)."""
    from kvpolicy.adapters.sglang.live import RowController

    controller = object.__new__(RowController)
    report = SimpleNamespace(compression=0.75)
    controller.num_layers, controller.num_heads = 3, 4
    controller.requests = {"r1": SimpleNamespace(next_position=[17, 17, 17], first=7, freed=90,
                                                 selector=SimpleNamespace(report=lambda: report))}
    with caplog.at_level(logging.INFO, logger="kvpolicy.adapters.sglang.live"):
        controller.on_release(SimpleNamespace(rid="r1", finished=lambda: True))
    m = PRUNED_LINE.search(caplog.text)
    assert m is not None and m.groups() == ("r1", "90", str(10 * 3 * 4), "0.7500")


def test_pruning_log_reads_the_server_log(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("[t] kvpolicy: request a finished: 1 of 8 entries freed; policy compression 0.1250\n"
                   "[t] something else\n"
                   "[t] kvpolicy: request b finished: 0 of 4 entries freed; policy compression 0.0000\n")
    assert Server(MODEL_DIR, PolicyRun("w", "window"), log, port=1).pruning_log() == {
        "a": (1, 8, 0.125), "b": (0, 4, 0.0)}


# -- granularity and vote ---------------------------------------------------------------------------------


def _window() -> PolicyRun:
    return parse_policy_run('window:{"window": 64}')


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
