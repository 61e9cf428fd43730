"""Fitting KVzap surrogates: closed-form ridge for the linear kind, AdamW for the MLP, and fit-quality scores.

Pure functions on tensors (``X (N, hidden)``, ``Y (N, kv_heads)``); nothing here depends on a language model.
The fitted modules are assembled into :class:`kvpolicy.surrogate.KVzapSurrogate` and saved with
:func:`kvpolicy.surrogate.save_surrogate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from kvpolicy.surrogate import KVzapSurrogate, SurrogateConfig


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected X (N, hidden) and Y (N, kv_heads), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 rows to fit, got {x.shape[0]}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("X and Y must be finite (clamp -inf log scores before fitting)")


def fit_linear_ridge(x: torch.Tensor, y: torch.Tensor, l2: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression ``y ≈ x @ W.T + b`` for one layer.

    ``x``: ``(N, hidden)``; ``y``: ``(N, kv_heads)``. The intercept is not penalized (data are centred).
    Returns ``weight (kv_heads, hidden)`` and ``bias (kv_heads,)`` in float32, i.e. an ``nn.Linear``'s
    parameters. Solved in float64.
    """
    _check_xy(x, y)
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    xd, yd = x.double(), y.double()
    x_mean, y_mean = xd.mean(0), yd.mean(0)
    xc, yc = xd - x_mean, yd - y_mean
    gram = xc.T @ xc + l2 * torch.eye(xc.shape[1], dtype=torch.float64, device=x.device)
    coef = torch.linalg.lstsq(gram, xc.T @ yc).solution  # (hidden, kv_heads); lstsq copes with l2 = 0
    bias = y_mean - x_mean @ coef
    return coef.T.float().contiguous(), bias.float()


class MLPFit(NamedTuple):
    module: nn.Sequential  # Linear -> GELU -> Linear, best validation epoch's weights, eval mode
    train_loss: list[float]  # mean MSE per epoch
    val_loss: list[float]  # MSE on the validation split per epoch
    best_epoch: int


def train_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    hidden_dim: int,
    *,
    epochs: int = 15,
    lr: float = 5e-3,
    weight_decay: float = 0.01,
    batch_size: int = 512,
    grad_clip: float = 1.0,
    val_fraction: float = 0.1,
    patience: int = 3,
    seed: int = 0,
) -> MLPFit:
    """Train one layer's MLP surrogate with MSE: AdamW, cosine schedule over all steps, gradient clipping.

    ``x``: ``(N, hidden)``, ``y``: ``(N, kv_heads)``. A seeded random ``val_fraction`` of the rows is held
    out; training stops after ``patience`` epochs without a better validation loss, and the best epoch's
    weights are returned. Deterministic for a given seed (on CPU).
    """
    _check_xy(x, y)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if hidden_dim < 1 or epochs < 1 or batch_size < 1 or patience < 1:
        raise ValueError("hidden_dim, epochs, batch_size and patience must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    order = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(n * val_fraction)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    x, y = x.float(), y.float()
    x_tr, y_tr, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]

    torch.manual_seed(seed)  # parameter init
    module = nn.Sequential(nn.Linear(x.shape[1], hidden_dim), nn.GELU(approximate="none"),
                           nn.Linear(hidden_dim, y.shape[1])).to(x.device)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    best = (math.inf, 0, {k: v.clone() for k, v in module.state_dict().items()})
    train_hist, val_hist = [], []
    for epoch in range(epochs):
        module.train()
        perm = torch.randperm(len(train_idx), generator=gen)
        total = 0.0
        for start in range(0, len(perm), batch_size):
            rows = perm[start:start + batch_size]
            loss = nn.functional.mse_loss(module(x_tr[rows]), y_tr[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
            opt.step()
            sched.step()
            total += loss.item() * len(rows)
        train_hist.append(total / len(perm))
        module.eval()
        with torch.no_grad():
            val = float(nn.functional.mse_loss(module(x_val), y_val))
        val_hist.append(val)
        if val < best[0]:
            best = (val, epoch, {k: v.clone() for k, v in module.state_dict().items()})
        elif epoch - best[1] >= patience:
            break
    module.load_state_dict(best[2])
    return MLPFit(module.eval().requires_grad_(False), train_hist, val_hist, best[1])


def fit_linear_surrogate(inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                         l2: float = 1.0) -> KVzapSurrogate:
    """Ridge-fit one linear module per layer. ``inputs[l]``: ``(N, hidden)``; ``targets[l]``: ``(N, kv_heads)``."""
    config = _config_for(inputs, targets, hidden_dim=None)
    surrogate = KVzapSurrogate(config)
    with torch.no_grad():
        for layer, (x, y) in enumerate(zip(inputs, targets)):
            weight, bias = fit_linear_ridge(x, y, l2)
            surrogate.layers[layer].weight.copy_(weight)
            surrogate.layers[layer].bias.copy_(bias)
    return surrogate.eval().requires_grad_(False)


def train_mlp_surrogate(inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], hidden_dim: int,
                        **train_kwargs) -> tuple[KVzapSurrogate, list[MLPFit]]:
    """:func:`train_mlp` per layer, assembled into a surrogate. Returns it and the per-layer fits."""
    config = _config_for(inputs, targets, hidden_dim=hidden_dim)
    surrogate = KVzapSurrogate(config)
    fits = []
    for layer, (x, y) in enumerate(zip(inputs, targets)):
        fit = train_mlp(x, y, hidden_dim, **train_kwargs)
        surrogate.layers[layer].load_state_dict(fit.module.state_dict())
        fits.append(fit)
    return surrogate.eval().requires_grad_(False), fits


def _config_for(inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                hidden_dim: int | None) -> SurrogateConfig:
    if len(inputs) != len(targets) or not inputs:
        raise ValueError(f"need one (inputs, targets) pair per layer, got {len(inputs)} and {len(targets)}")
    return SurrogateConfig(model_type="kvzap", input_dim=inputs[0].shape[1], output_dim=targets[0].shape[1],
                           n_modules=len(inputs), hidden_dim=hidden_dim)


# ------------------------------------------------------------------------------------------------------
# Fit quality
# ------------------------------------------------------------------------------------------------------
def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Coefficient of determination over all entries: ``1 - SS_res / SS_tot`` (tensors flattened)."""
    p, t = pred.double().flatten(), target.double().flatten()
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in size")
    ss_tot = float(((t - t.mean()) ** 2).sum())
    ss_res = float(((t - p) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else -math.inf)


def pearson_r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Squared Pearson correlation of ``pred`` and ``target`` over all entries (the KVzap paper's metric)."""
    p, t = pred.double().flatten(), target.double().flatten()
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in size")
    pc, tc = p - p.mean(), t - t.mean()
    denom = float(pc.norm() * tc.norm())
    return float((pc @ tc) / denom) ** 2 if denom > 0 else 0.0
