"""Policy spec parsing and the comparison outputs (table, CSV, plot)."""

from __future__ import annotations

import csv

import pytest

from kvpolicy.lab.compare import PolicySpec, Row, parse_specs, read_csv, to_markdown, write_outputs


def test_specs_expand_sweeps():
    specs = parse_specs(["full", "window:window=64", "kvzap_mlp:threshold=-3|-4|-5,window=32"])
    assert specs[0] == PolicySpec("full")
    assert specs[1] == PolicySpec("window", {"window": 64})
    assert [s.config["threshold"] for s in specs[2:]] == [-3, -4, -5]
    assert all(s.config["window"] == 32 for s in specs[2:])


@pytest.mark.parametrize("bad", [":x=1", "window:window", "full:threshold=1"])
def test_bad_specs_are_explained(bad):
    with pytest.raises(ValueError):
        parse_specs([bad])


def test_outputs_are_written(tmp_path):
    rows = [
        Row("full", "full", {}, {"needle": 1.0, "repeat": 0.9}, 0.95, 0.0, 1000, 1000, 0.1, 0.2),
        Row("window(window=8)", "window", {"window": 8}, {"needle": 0.2, "repeat": 0.1}, 0.15, 0.7, 300, 1000, 0.1, 0.1),
        Row("window(window=16)", "window", {"window": 16}, {"needle": 0.4, "repeat": 0.2}, 0.3, 0.5, 500, 1000, 0.1, 0.1),
    ]
    paths = write_outputs(rows, tmp_path)
    table = paths["markdown"].read_text()
    assert "| window(window=8) | 20.0 | 10.0 | 15.0 | 0.700 |" in table
    assert to_markdown(rows).count("\n") == 5
    with open(paths["csv"]) as fh:
        assert len(list(csv.reader(fh))) == 4
    assert paths["plot"].stat().st_size > 1000
    assert read_csv(paths["csv"]) == rows
