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
