"""Compare policies on the same model and suite: a leaderboard table (markdown + CSV) and a plot.

Policy specs on the command line: ``NAME`` or ``NAME:key=value,key=v1|v2|v3``; ``|`` alternatives are
swept (cartesian product over keys). Values are parsed as JSON when possible (``-4``, ``0.5``, ``"-inf"``
is passed as the string and converted by pydantic). ``full`` means no policy (the full cache).
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FULL = "full"


@dataclass(frozen=True)
class PolicySpec:
    name: str  # registry name, or "full"
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.config:
            return self.name
        inner = ", ".join(f"{k}={v}" for k, v in self.config.items() if k != "surrogate")
        return f"{self.name}({inner})"


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_specs(texts: Iterable[str]) -> list[PolicySpec]:
    """Expand ``NAME:key=v1|v2,key2=v`` specs into one :class:`PolicySpec` per combination."""
    specs: list[PolicySpec] = []
    for text in texts:
        name, _, rest = text.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"policy spec {text!r} has no policy name")
        keys, choices = [], []
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, values = item.partition("=")
            if not sep:
                raise ValueError(f"policy spec {text!r}: {item!r} is not key=value")
            keys.append(key.strip())
            choices.append([_parse_value(v.strip()) for v in values.split("|")])
        if name == FULL and keys:
            raise ValueError("'full' (no policy) takes no configuration")
        for combo in itertools.product(*choices) if keys else [()]:
            specs.append(PolicySpec(name, dict(zip(keys, combo))))
    return specs


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


def run(specs: Sequence[PolicySpec], evaluate: Callable[[PolicySpec], Row], progress: bool = True) -> list[Row]:
    """Evaluate every spec with ``evaluate`` (same model, same suite) and return the rows in order."""
    from tqdm.auto import tqdm

    return [evaluate(spec) for spec in tqdm(specs, desc="policies", disable=not progress)]


def to_markdown(rows: Sequence[Row]) -> str:
    tasks = sorted({t for r in rows for t in r.task_scores})
    head = ["policy", *tasks, "average", "compression", "KV MiB", "KV vs full", "prefill s", "decode s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = r.kv_bytes / r.full_kv_bytes if r.full_kv_bytes else float("nan")
        cells = [r.label, *(f"{100 * r.task_scores.get(t, float('nan')):.1f}" for t in tasks),
                 f"{100 * r.average:.1f}", f"{r.compression:.3f}", f"{r.kv_bytes / 2**20:.2f}", f"{ratio:.3f}",
                 f"{r.prefill_s:.2f}", f"{r.decode_s:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], path: Path) -> None:
    tasks = sorted({t for r in rows for t in r.task_scores})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", "policy", "config", *tasks, "average", "compression", "kv_bytes",
                         "full_kv_bytes", "prefill_s", "decode_s"])
        for r in rows:
            writer.writerow([r.label, r.policy, json.dumps(r.config), *(r.task_scores.get(t) for t in tasks),
                             r.average, r.compression, r.kv_bytes, r.full_kv_bytes, r.prefill_s, r.decode_s])


def read_csv(path: Path) -> list[Row]:
    """Rows written by :func:`write_csv` (e.g. to redraw a plot without re-running the suite)."""
    fixed = {"label", "policy", "config", "average", "compression", "kv_bytes", "full_kv_bytes", "prefill_s",
             "decode_s"}
    rows = []
    with open(path, newline="") as fh:
        for rec in csv.DictReader(fh):
            tasks = {k: float(v) for k, v in rec.items() if k not in fixed and v not in ("", None)}
            rows.append(Row(rec["label"], rec["policy"], json.loads(rec["config"]), tasks, float(rec["average"]),
                            float(rec["compression"]), int(rec["kv_bytes"]), int(rec["full_kv_bytes"]),
                            float(rec["prefill_s"]), float(rec["decode_s"])))
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
        if policy == FULL:
            for r in items:
                ax.axhline(100 * r.average, color="black", linestyle="--", linewidth=1, label="full cache")
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


def write_outputs(rows: Sequence[Row], out_dir: Path, title: str = "score vs compression") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "results.md", "csv": out_dir / "results.csv", "plot": out_dir / "score_vs_compression.png"}
    paths["markdown"].write_text(to_markdown(rows))
    write_csv(rows, paths["csv"])
    plot(rows, paths["plot"], title)
    return paths
