"""The ``kvpolicy`` command line: what is refused before any work (exit status 2, a clear message, nothing
evaluated or overwritten), and what is still written when matplotlib is missing.

Evaluation is replaced by stubs that record being called: a refusal must come before them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvpolicy.lab import cli, compare, serve_bench
from kvpolicy.lab import train_kvzap as tk
from kvpolicy.lab.compare import Row
from kvpolicy.lab.testbed import MODEL_DIR


class Calls:
    def __init__(self) -> None:
        self.load_model: list = []
        self.evaluated: list = []
        self.trained: list = []
        self.served: list = []


@pytest.fixture()
def calls(monkeypatch) -> Calls:
    """Model loading, evaluation, training and serving stubbed out (recorded)."""
    seen = Calls()

    def load_model(directory):
        seen.load_model.append(directory)
        return object(), object()

    def run(specs, evaluate, progress=True):
        seen.evaluated.extend(specs)
        return [Row(s.label, s.name, s.config, {"single_needle": 1.0}, 1.0, 0.0, 10, 10, 0.1, 0.1) for s in specs]

    def train(model, prompts, out_dir, **kwargs):
        seen.trained.append(out_dir)
        return []

    def run_bench(model, runs, examples, concurrencies, out, **kwargs):
        seen.served.extend(runs)
        return []

    monkeypatch.setattr(cli, "_load_model", load_model)
    monkeypatch.setattr(compare, "run", run)
    monkeypatch.setattr(tk, "train_kvzap", train)
    monkeypatch.setattr(tk, "testbed_prompts", lambda *args: [])
    monkeypatch.setattr(serve_bench, "run_bench", run_bench)
    monkeypatch.setattr(serve_bench, "suite_examples", lambda *args: [])
    return seen


def _compare(tmp_path, *extra: str) -> list[str]:
    return ["compare", "--tasks", "single_needle", "--lengths", "256", "-n", "1", "--out", str(tmp_path / "out"),
            *extra]


def test_compare_runs_with_the_one_grammar(tmp_path, calls, capsys):
    argv = _compare(tmp_path, "--policy", "none", "--policy", "window:window=32|64",
                    "--policy", "kvzap_mlp:threshold=-4,window=32")
    assert cli.main(argv) == 0
    assert [s.label for s in calls.evaluated] == ["none (full cache)", "window(window=32)", "window(window=64)",
                                                   "kvzap_mlp(threshold=-4, window=32)"]
    out = capsys.readouterr().out
    assert "| none (full cache) |" in out and (tmp_path / "out" / "results.csv").is_file()


@pytest.mark.parametrize(
    "policies, message",
    [
        (["none", "window:window=64", "no_such_policy"], "unknown policy 'no_such_policy'"),
        (["none", "window:window=64", "knorm:ratio=0.5|0.7|1.5"], "knorm(ratio=1.5): ratio: Input should be less"),
        (["none", "window:threshold=\"-4\""], "threshold: expected a number, got the string '-4'"),
        (["none", "window:window=64", "kvzap_mlp:surrogate=/no/such/dir"], "/no/such/dir does not exist"),
        (["none", "window:window"], "'window' is not key=value"),
        (["full"], "unknown policy 'full'"),
    ],
    ids=["unknown-name", "last-sweep-point", "quoted-number", "missing-surrogate", "syntax", "full-is-gone"],
)
def test_compare_checks_every_spec_before_evaluating(tmp_path, calls, capsys, policies, message):
    argv = _compare(tmp_path, *(arg for p in policies for arg in ("--policy", p)))
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("kvpolicy compare: error: ") and message in err, err
    assert "Traceback" not in err
    assert calls.load_model == [] and calls.evaluated == []
    assert not (tmp_path / "out").exists()


def test_compare_refuses_an_out_that_is_a_file(tmp_path, calls, capsys):
    (tmp_path / "out").write_text("keep me")
    assert cli.main(_compare(tmp_path, "--policy", "none")) == cli.EXIT_USAGE
    assert "is an existing file, not a directory" in capsys.readouterr().err
    assert calls.evaluated == [] and (tmp_path / "out").read_text() == "keep me"


def test_compare_refuses_a_non_empty_out_unless_overwrite(tmp_path, calls, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("earlier results")
    assert cli.main(_compare(tmp_path, "--policy", "none")) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "is not empty" in err and "give --overwrite" in err
    assert calls.evaluated == [] and (out / "results.md").read_text() == "earlier results"
    assert cli.main(_compare(tmp_path, "--policy", "none", "--overwrite")) == 0
    assert "| none (full cache) |" in (out / "results.md").read_text()


def test_an_empty_out_directory_needs_no_overwrite(tmp_path, calls):
    (tmp_path / "out").mkdir()
    assert cli.main(_compare(tmp_path, "--policy", "none")) == 0


def test_compare_without_matplotlib_prints_and_writes_the_table(tmp_path, calls, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert cli.main(_compare(tmp_path, "--policy", "none", "--policy", "window:window=64")) == 0
    out = capsys.readouterr().out
    assert "| window(window=64) |" in out and "plot skipped: matplotlib is not installed" in out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"results.md", "results.csv"}


def test_demo_replaces_its_own_scratch_directory_only(tmp_path, calls, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo"]) == 0
    assert cli.main(["demo"]) == 0  # results/demo is the demo's own: replaced on every run
    assert calls.evaluated[0].is_none and len(calls.evaluated) == 8
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    assert cli.main(["demo", "--out", str(other)]) == cli.EXIT_USAGE
    assert "is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["compare", "train-kvzap", "bench-serve"])
def test_a_model_name_that_is_not_a_local_directory_is_refused(tmp_path, calls, capsys, command):
    argv = [command, "--model", "Qwen/Qwen3-8B", "--out", str(tmp_path / "out")]
    argv += ["--policy", "none"] if command != "train-kvzap" else ["--prompts", str(tmp_path / "p.jsonl")]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--model 'Qwen/Qwen3-8B' is not a local directory" in err, err
    assert calls.load_model == [] and calls.trained == [] and calls.served == []


def test_models_and_tokenizers_are_loaded_local_only(monkeypatch):
    import transformers

    seen = []

    class Loaded:
        def eval(self):
            return self

    def from_pretrained(path, **kwargs):
        seen.append(kwargs)
        return Loaded()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    cli._load_model(MODEL_DIR)
    assert seen == [{"local_files_only": True}, {"local_files_only": True}]


def test_train_kvzap_refuses_to_replace_the_shipped_surrogates(calls, capsys):
    testbed = Path(tk.__file__).with_name("testbed")
    before = {p: p.stat().st_mtime_ns for p in testbed.glob("kvzap-*/*")}
    assert cli.main(["train-kvzap", "--out", str(testbed)]) == cli.EXIT_USAGE
    assert "is not empty" in capsys.readouterr().err
    assert calls.load_model == [] and calls.trained == []
    assert {p: p.stat().st_mtime_ns for p in testbed.glob("kvzap-*/*")} == before


def test_train_kvzap_writes_into_a_non_empty_out_with_overwrite(tmp_path, calls, capsys):
    out = tmp_path / "out"
    (out / "kvzap-mlp").mkdir(parents=True)
    assert cli.main(["train-kvzap", "--out", str(out)]) == cli.EXIT_USAGE
    assert calls.trained == []
    assert cli.main(["train-kvzap", "--out", str(out), "--overwrite"]) == 0
    assert calls.trained == [out]


def test_bench_serve_reads_the_one_grammar_and_fills_in_the_testbed_surrogate(tmp_path, calls):
    out = tmp_path / "out"
    assert cli.main(["bench-serve", "--policy", "none", "--policy", "window:window=32|64",
                     "--policy", "kvzap_mlp:threshold=-2,window=32", "--out", str(out)]) == 0
    assert [r.label for r in calls.served] == ["none", "window window=32", "window window=64",
                                               "kvzap_mlp threshold=-2,window=32"]
    assert calls.served[3].config["surrogate"].endswith("kvzap-mlp") and calls.served[3].config["threshold"] == -2


@pytest.mark.parametrize(
    "policy, message",
    [("window:ratio=0.5", "threshold selection only"), ("kvzip_plus", "is an oracle"),
     ("no_such_policy", "unknown policy"), ("window:window=64|x", "expected a number, got the string 'x'"),
     ('window:{"window": 64}', "is not key=value")],
    ids=["ratio", "oracle", "unknown", "bad-sweep-point", "old-json-form"],
)
def test_bench_serve_refuses_before_any_server_starts(tmp_path, calls, capsys, policy, message):
    argv = ["bench-serve", "--policy", "none", "--policy", "window:window=64", "--policy", policy,
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("kvpolicy bench-serve: error: ") and message in err, err
    assert calls.served == []


def test_bench_serve_refuses_a_non_empty_out(tmp_path, calls, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("earlier")
    assert cli.main(["bench-serve", "--out", str(out)]) == cli.EXIT_USAGE
    assert "is not empty" in capsys.readouterr().err and calls.served == []
    assert cli.main(["bench-serve", "--out", str(out), "--overwrite"]) == 0
    assert [r.label for r in calls.served] == ["none", "window window=64"]
