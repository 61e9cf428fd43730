"""Pure parts of :mod:`kvpolicy.serve_bench` (no server)."""

from __future__ import annotations

import pytest

from kvpolicy.serve_bench import PRUNED_LINE, PolicyRun, parse_policy_run, percentile


def test_parse_policy_run():
    assert parse_policy_run("none") == PolicyRun("none")
    run = parse_policy_run('window:{"window": 64}')
    assert (run.policy, run.config, run.label) == ("window", {"window": 64}, "window window=64")
    run = parse_policy_run('kvzap_mlp:{"surrogate": "/x", "threshold": -4}')
    assert run.label == "kvzap_mlp threshold=-4" and run.config["surrogate"] == "/x"
    with pytest.raises(ValueError):
        parse_policy_run('none:{"a": 1}')
    with pytest.raises(ValueError):
        parse_policy_run("window:[1]")


@pytest.mark.parametrize("q, expected", [(0, 1.0), (50, 2.0), (90, 4.0), (99, 4.0), (100, 4.0)], ids=str)
def test_percentile_nearest_rank(q, expected):
    assert percentile([4.0, 1.0, 3.0, 2.0], q) == expected
    assert percentile([], q) is None


def test_pruned_line_matches_the_adapter_log_format():
    line = ("[2026-11-23 07:08:51] kvpolicy: request 5a5c6b finished: 39 of 47 tokens pruned; policy compression "
            "0.830 (156/188 pruned; L0=0.830, L1=0.830); 41 KV slots freed by this worker so far")
    m = PRUNED_LINE.search(line)
    assert m is not None and m.groups() == ("5a5c6b", "39", "47", "0.830")


def test_token_vote_reaches_the_launcher_and_its_validation():
    from kvpolicy.adapters.sglang.config import TokenVote, parse_policy_flags
    from kvpolicy.adapters.sglang.launch import _parser
    from kvpolicy.serve_bench import Server

    run = parse_policy_run('window:{"window": 64}').with_vote("fraction", 0.5)
    assert run.label == "window window=64 vote=fraction(0.5)"
    argv = Server("/m", run, "/tmp/unused.log").command()
    launcher_args = argv[argv.index("kvpolicy.adapters.sglang.launch") + 1:]
    ours, _ = _parser().parse_known_args(launcher_args)
    config = parse_policy_flags(ours.kv_policy, ours.kv_policy_config, token_vote=ours.kv_token_vote,
                                min_keep_fraction=ours.kv_min_keep_fraction)
    assert config.token_vote is TokenVote.FRACTION and config.min_keep_fraction == 0.5
    # No vote given: the launcher's default; 'none' runs plain SGLang and takes no vote.
    assert "--kv-token-vote" not in Server("/m", parse_policy_run("window"), "/tmp/unused.log").command()
    assert parse_policy_run("none").with_vote("fraction") == PolicyRun("none")
    # A bad combination is refused by the same validation the launcher runs.
    with pytest.raises(ValueError, match="min_keep_fraction"):
        parse_policy_flags("window", None, token_vote="any", min_keep_fraction=0.5)
