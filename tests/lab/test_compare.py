"""Policy spec parsing and the comparison outputs (table, CSV, plot)."""

from __future__ import annotations

import csv
import sys

import pytest

from kvpolicy.lab.compare import PolicySpec, Row, SpecError, parse_specs, read_csv, to_markdown, write_outputs
from kvpolicy.lab.stats import wilson_interval


def test_specs_expand_sweeps():
    specs = parse_specs(["none", "window:window=64", "kvzap_mlp:threshold=-3|-4|-5,window=32"])
    assert specs[0] == PolicySpec("none") and specs[0].is_none and specs[0].label == "none (full cache)"
    assert specs[1] == PolicySpec("window", {"window": 64}) and specs[1].label == "window(window=64)"
    assert [s.config["threshold"] for s in specs[2:]] == [-3, -4, -5]
    assert all(s.config["window"] == 32 for s in specs[2:])


@pytest.mark.parametrize("bad", [":x=1", "window:window", "none:threshold=1"])
def test_bad_specs_are_explained(bad):
    with pytest.raises(SpecError):
        parse_specs([bad])


def _rows() -> list[Row]:
    return [
        Row("none (full cache)", "none", {}, {"needle": 1.0, "repeat": 0.9}, 0.95, 0.0, 1000, 1000, 0.1, 0.2),
        Row("window(window=8)", "window", {"window": 8}, {"needle": 0.2, "repeat": 0.1}, 0.15, 0.7, 300, 1000,
            0.1, 0.1),
        Row("window(window=16)", "window", {"window": 16}, {"needle": 0.4, "repeat": 0.2}, 0.3, 0.5, 500, 1000,
            0.1, 0.1),
    ]


def test_outputs_are_written(tmp_path):
    rows = _rows()
    paths = write_outputs(rows, tmp_path)
    table = paths["markdown"].read_text()
    assert "| window(window=8) | 20.0 | 10.0 | 15.0 | 0.700 |" in table
    assert to_markdown(rows).count("\n") == 5
    with open(paths["csv"]) as fh:
        assert len(list(csv.reader(fh))) == 4
    assert paths["plot"].stat().st_size > 1000
    assert read_csv(paths["csv"]) == rows


def test_without_matplotlib_the_table_and_csv_are_still_written(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    paths = write_outputs(_rows(), tmp_path)
    assert set(paths) == {"markdown", "csv"}
    assert "| none (full cache) |" in paths["markdown"].read_text()
    assert read_csv(paths["csv"]) == _rows()
    assert not (tmp_path / "score_vs_compression.png").exists()


def test_csv_written_before_the_one_grammar_reads_full_as_none(tmp_path):
    rows = _rows()
    path = tmp_path / "results.csv"
    write_outputs(rows, tmp_path)
    path.write_text(path.read_text().replace("none (full cache),none,", "full,full,"))
    assert [r.policy for r in read_csv(path)] == ["none", "window", "window"]


def test_every_score_has_its_95_percent_interval_when_the_examples_are_known(tmp_path):
    row = Row("kvzap", "kvzap_mlp", {}, {"needle": 1.0, "repeat": 0.5}, 0.75, 0.6, 10, 30, 0.1, 0.1,
              {"needle": 20, "repeat": 20})
    assert row.interval("needle") == pytest.approx((0.839, 1.0), abs=1e-3)  # 20 of 20
    assert row.interval("repeat") == pytest.approx((0.299, 0.701), abs=1e-3)  # 10 of 20
    assert row.interval() == pytest.approx(wilson_interval(30, 40))  # the average pools all 40 examples
    table = to_markdown([row])
    assert "| kvzap | 100.0 [83.9, 100.0] | 50.0 [29.9, 70.1] | 75.0 [59.8, 85.8] | 0.600 |" in table
    write_outputs([row], tmp_path)
    assert read_csv(tmp_path / "results.csv") == [row]
    # rows whose example counts are unknown (older CSVs) print the score alone
    assert "| window(window=8) | 20.0 | 10.0 | 15.0 | 0.700 |" in to_markdown(_rows())


@pytest.mark.parametrize("k, n", [(0, 20), (20, 20), (7, 13), (1, 1)])
def test_wilson_interval_contains_the_estimate_and_stays_in_0_1(k, n):
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    # more examples, narrower interval
    assert (high - low) > (wilson_interval(4 * k, 4 * n)[1] - wilson_interval(4 * k, 4 * n)[0])
