"""Compare policies on the same model and suite: a leaderboard table (markdown + CSV) and a plot.

Policy specs use the lab's one grammar (:mod:`kvpolicy.lab.specs`): ``NAME[:key=value,...]``, ``|`` in a value
sweeps it, ``none`` is no policy (the full cache). The plot needs matplotlib (the ``plots`` extra); without it
the table and the CSV are still written.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpolicy.lab.specs import PolicySpec, SpecError, parse_specs
from kvpolicy.lab.stats import wilson_interval
from kvpolicy.registry import NO_POLICY

_LEGACY_NO_POLICY = "full"  # what CSVs written before the one grammar call no policy

__all__ = ["PolicySpec", "Row", "SpecError", "parse_specs", "plot", "read_csv", "run", "to_markdown", "write_csv",
           "write_outputs"]


@dataclass
class Row:
    """One policy configuration's measured results on the suite."""

    label: str
    policy: str
    config: dict[str, Any]
    task_scores: dict[str, float]
    average: float
    compression: float
    kv_bytes: int
    full_kv_bytes: int
    prefill_s: float
    decode_s: float
    # Examples scored per task (every length together); 0 where unknown (CSVs written before it was recorded).
    task_examples: dict[str, int] = field(default_factory=dict)

    def interval(self, task: str | None = None) -> tuple[float, float] | None:
        """95% Wilson interval of a task's score, or of the average over all examples (``task=None``);
        None when the number of examples is not known."""
        if task is None:
            n = sum(self.task_examples.values())
            if n == 0 or len(self.task_examples) != len(self.task_scores):
                return None
            correct = sum(self.task_scores[t] * k for t, k in self.task_examples.items())
            return wilson_interval(correct, n)
        n = self.task_examples.get(task, 0)
        return wilson_interval(self.task_scores[task] * n, n) if n and task in self.task_scores else None


def run(specs: Sequence[PolicySpec], evaluate: Callable[[PolicySpec], Row], progress: bool = True) -> list[Row]:
    """Evaluate every spec with ``evaluate`` (same model, same suite) and return the rows in order."""
    from tqdm.auto import tqdm

    return [evaluate(spec) for spec in tqdm(specs, desc="policies", disable=not progress)]


def _percent(value: float, interval: tuple[float, float] | None) -> str:
    """``97.5 [86.8, 99.6]``: a score in percent with its 95% interval."""
    if interval is None:
        return f"{100 * value:.1f}"
    return f"{100 * value:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def to_markdown(rows: Sequence[Row]) -> str:
    """The leaderboard; every score (percent exact match) comes with its 95% Wilson interval when the number of
    examples is known."""
    tasks = sorted({t for r in rows for t in r.task_scores})
    head = ["policy", *tasks, "average", "compression", "KV MiB", "KV vs full", "prefill s", "decode s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = r.kv_bytes / r.full_kv_bytes if r.full_kv_bytes else float("nan")
        cells = [r.label,
                 *(_percent(r.task_scores[t], r.interval(t)) if t in r.task_scores else "nan" for t in tasks),
                 _percent(r.average, r.interval()), f"{r.compression:.3f}", f"{r.kv_bytes / 2**20:.2f}",
                 f"{ratio:.3f}", f"{r.prefill_s:.2f}", f"{r.decode_s:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], path: Path) -> None:
    tasks = sorted({t for r in rows for t in r.task_scores})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", "policy", "config", *tasks, "average", "compression", "kv_bytes",
                         "full_kv_bytes", "prefill_s", "decode_s", "examples", "average_low", "average_high"])
        for r in rows:
            low, high = r.interval() or (None, None)
            writer.writerow([r.label, r.policy, json.dumps(r.config), *(r.task_scores.get(t) for t in tasks),
                             r.average, r.compression, r.kv_bytes, r.full_kv_bytes, r.prefill_s, r.decode_s,
                             json.dumps(r.task_examples), low, high])


def read_csv(path: Path) -> list[Row]:
    """Rows written by :func:`write_csv` (e.g. to redraw a plot without re-running the suite)."""
    fixed = {"label", "policy", "config", "average", "compression", "kv_bytes", "full_kv_bytes", "prefill_s",
             "decode_s", "examples", "average_low", "average_high"}
    rows = []
    with open(path, newline="") as fh:
        for rec in csv.DictReader(fh):
            tasks = {k: float(v) for k, v in rec.items() if k not in fixed and v not in ("", None)}
            policy = NO_POLICY if rec["policy"] == _LEGACY_NO_POLICY else rec["policy"]
            rows.append(Row(rec["label"], policy, json.loads(rec["config"]), tasks, float(rec["average"]),
                            float(rec["compression"]), int(rec["kv_bytes"]), int(rec["full_kv_bytes"]),
                            float(rec["prefill_s"]), float(rec["decode_s"]),
                            json.loads(rec.get("examples") or "{}")))
    return rows


def plot(rows: Sequence[Row], path: Path, title: str = "score vs compression") -> None:
    """Average score vs achieved compression, one curve per policy (the full cache as a horizontal line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_policy: dict[str, list[Row]] = {}
    for r in rows:
        # One curve per policy and selection scope (a per-head and a global ranking are different methods).
        key = r.policy if "scope" not in r.config else f"{r.policy} (scope={r.config['scope']})"
        by_policy.setdefault(key, []).append(r)
    for policy, items in by_policy.items():
        if policy == NO_POLICY:
            for r in items:
                ax.axhline(100 * r.average, color="black", linestyle="--", linewidth=1, label="none (full cache)")
            continue
        items = sorted(items, key=lambda r: r.compression)
        ax.plot([r.compression for r in items], [100 * r.average for r in items], marker="o", label=policy)
    ax.set_xlabel("achieved compression (pruned / all KV entries)")
    ax.set_ylabel("average exact-match score (%)")
    ax.set_title(title)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plotting_available() -> bool:
    """Whether matplotlib (the ``plots`` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_outputs(rows: Sequence[Row], out_dir: Path, title: str = "score vs compression") -> dict[str, Path]:
    """Write ``results.md``, ``results.csv`` and, when matplotlib is installed, ``score_vs_compression.png``;
    returns the paths written (no ``"plot"`` key when the plot was skipped)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "results.md", "csv": out_dir / "results.csv"}
    paths["markdown"].write_text(to_markdown(rows))
    write_csv(rows, paths["csv"])
    if plotting_available():
        paths["plot"] = out_dir / "score_vs_compression.png"
        plot(rows, paths["plot"], title)
    return paths
