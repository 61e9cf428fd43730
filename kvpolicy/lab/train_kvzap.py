"""Train KVzap surrogates (linear and MLP) from the KVzip+ oracle: ``kvpolicy train-kvzap``.

1. KVzip+ scores (full-sequence softmax) of every context token of the *training* prompts, paired with the
   attention-layer inputs (``kvpolicy.lab.training.collect_oracle_targets``), ``positions`` sampled per prompt;
2. KVzap-Linear by ridge regression (closed form), KVzap-MLP by AdamW + cosine schedule + grad-clip with
   early stopping on a validation split (``kvpolicy.surrogate``);
3. per-layer R² and squared Pearson against the oracle on held-out prompts;
4. saved in NVIDIA's checkpoint layout, loadable by the ``kvzap_linear`` / ``kvzap_mlp`` policies.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvpolicy.lab.fit import fit_linear_surrogate, pearson_r2, r2_score, train_mlp_surrogate
from kvpolicy.lab.training import SurrogateDataset, collect_oracle_targets
from kvpolicy.registry import get_policy
from kvpolicy.surrogate import KVzapSurrogate, save_surrogate


@dataclass
class FitReport:
    kind: str
    path: str
    r2: list[float]  # per layer, held-out prompts
    pearson_r2: list[float]
    train_rows: int
    held_out_rows: int

    def table(self) -> str:
        rows = [f"{self.kind}: {self.path}  ({self.train_rows} train rows, {self.held_out_rows} held-out rows)",
                f"{'layer':>6}{'R2':>9}{'pearson^2':>11}"]
        rows += [f"{i:>6}{a:>9.3f}{b:>11.3f}" for i, (a, b) in enumerate(zip(self.r2, self.pearson_r2))]
        return "\n".join(rows)


def evaluate_surrogate(surrogate: KVzapSurrogate, data: SurrogateDataset) -> tuple[list[float], list[float]]:
    r2, pr2 = [], []
    with torch.no_grad():
        for layer in range(data.num_layers):
            pred = surrogate(layer, data.inputs[layer])
            r2.append(r2_score(pred, data.targets[layer]))
            pr2.append(pearson_r2(pred, data.targets[layer]))
    return r2, pr2


def train_kvzap(
    model,
    prompts: Sequence[torch.Tensor],
    out_dir: str | Path,
    *,
    oracle_config: dict | None = None,
    kinds: Sequence[str] = ("linear", "mlp"),
    positions: int = 500,
    held_out_fraction: float = 0.2,
    mlp_hidden_dim: int | None = None,
    ridge_l2: float = 1.0,
    mlp_kwargs: dict | None = None,
    tokenizer=None,
    seed: int = 0,
    progress: bool = True,
) -> list[FitReport]:
    """Fit the requested surrogate kinds and save each under ``out_dir/kvzap-{kind}``."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    unknown = set(kinds) - {"linear", "mlp"}
    if unknown:
        raise ValueError(f"unknown surrogate kind(s) {sorted(unknown)}; use 'linear' and/or 'mlp'")
    oracle = get_policy("kvzip_plus", **(oracle_config or {}))
    data = collect_oracle_targets(model, prompts, oracle, positions_per_prompt=positions, tokenizer=tokenizer,
                                  seed=seed, progress=progress)
    n_prompts = len(prompts)
    n_held = max(1, round(n_prompts * held_out_fraction))
    if n_held >= n_prompts:
        raise ValueError(f"need more than {n_held} prompts to hold {held_out_fraction:.0%} out")
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed)).tolist()
    train, held = data.split_by_prompt(set(order[:n_held]))
    out_dir = Path(out_dir)
    reports = []
    for kind in kinds:
        if kind == "linear":
            surrogate = fit_linear_surrogate(train.inputs, train.targets, l2=ridge_l2)
        else:
            width = mlp_hidden_dim or max(1, train.inputs[0].shape[1] // 8)
            surrogate, _ = train_mlp_surrogate(train.inputs, train.targets, width, seed=seed, **(mlp_kwargs or {}))
        path = save_surrogate(surrogate, out_dir / f"kvzap-{kind}")
        r2, pr2 = evaluate_surrogate(surrogate, held)
        report = FitReport(kind, str(path), r2, pr2, int(train.prompt_index.numel()), int(held.prompt_index.numel()))
        (Path(path) / "fit_report.json").write_text(json.dumps(asdict(report), indent=2))
        reports.append(report)
    return reports


def testbed_prompts(count: int, lengths: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Training prompts for the testbed: task contexts (without the question: the policy prunes the context
    before the question is asked) from a seed disjoint from the evaluation suite's."""
    from kvpolicy.lab.eval import EVAL_SEED
    from kvpolicy.lab.testbed.tasks import TASKS, generate

    if seed == EVAL_SEED:
        raise ValueError(f"seed {seed} is the evaluation suite's seed; surrogates must not see evaluation prompts")
    prompts = []
    for index in range(count):
        task = TASKS[index % len(TASKS)]
        length = lengths[(index // len(TASKS)) % len(lengths)]
        example = generate(task, length, seed, index)
        prompts.append(torch.tensor([example.prompt[: example.context_len]]))
    return prompts
