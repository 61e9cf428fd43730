"""Fitting KVzap surrogates (kvpolicy.lab.fit): ridge, MLP training, fit quality."""

import math

import pytest
import torch

import kvpolicy
from kvpolicy.lab.fit import (
    fit_linear_ridge,
    fit_linear_surrogate,
    pearson_r2,
    r2_score,
    train_mlp,
    train_mlp_surrogate,
)
from kvpolicy.surrogate import save_surrogate
from tests.policies.helpers import make_inputs, model_info


def test_ridge_recovers_exact_linear_map():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=gen)
    w, b = torch.randn(3, 12, generator=gen), torch.randn(3, generator=gen)
    y = x @ w.T + b
    weight, bias = fit_linear_ridge(x, y, l2=0.0)
    torch.testing.assert_close(weight, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bias, b, atol=1e-4, rtol=1e-4)
    assert r2_score(x @ weight.T + bias, y) > 0.999999
    # a strong penalty shrinks the weights but not the (unpenalized) intercept towards the mean of y
    weight_big, bias_big = fit_linear_ridge(x, y, l2=1e9)
    assert weight_big.abs().max() < 1e-3
    torch.testing.assert_close(bias_big, y.mean(0), atol=1e-3, rtol=0)


def test_fit_quality_helpers():
    t = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert r2_score(t, t) == 1.0 and pearson_r2(t, t) == pytest.approx(1.0)
    assert pearson_r2(2 * t + 5, t) == pytest.approx(1.0)  # squared Pearson ignores scale and shift
    assert r2_score(2 * t + 5, t) < 0
    assert r2_score(torch.full_like(t, t.mean()), t) == pytest.approx(0.0)
    assert pearson_r2(-t, t) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        fit_linear_ridge(torch.randn(5, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="finite"):
        fit_linear_ridge(torch.randn(5, 3), torch.full((5, 2), -math.inf))


def test_train_mlp_learns_and_is_deterministic():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, 6, generator=gen)
    y = torch.stack([torch.tanh(2 * x[:, 0]) + 0.5 * x[:, 1], x[:, 2].abs()], dim=1)
    fit = train_mlp(x, y, hidden_dim=16, epochs=20, batch_size=100, patience=4, seed=0)
    assert fit.val_loss[fit.best_epoch] == min(fit.val_loss)
    assert min(fit.val_loss) < 0.5 * fit.val_loss[0]
    assert r2_score(fit.module(x), y) > 0.5
    short = [train_mlp(x, y, hidden_dim=16, epochs=2, batch_size=100, seed=3).val_loss for _ in range(2)]
    assert short[0] == short[1]
    assert isinstance(fit.module[1], torch.nn.GELU) and fit.module[1].approximate == "none"


def test_fitted_surrogates_save_and_score_through_the_policies(tmp_path):
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(200, 16, generator=gen) for _ in range(3)]
    ys = [torch.randn(200, 2, generator=gen) for _ in range(3)]
    linear = fit_linear_surrogate(xs, ys, l2=1.0)
    mlp, fits = train_mlp_surrogate(xs, ys, hidden_dim=4, epochs=2, batch_size=64)
    assert len(fits) == 3 and mlp.config.hidden_dim == 4
    inputs = make_inputs(layer_idx=2)
    for kind, surrogate in (("linear", linear), ("mlp", mlp)):
        directory = save_surrogate(surrogate, tmp_path / kind)
        policy = kvpolicy.get_policy(f"kvzap_{kind}", surrogate=str(directory))
        policy.bind(model_info())
        torch.testing.assert_close(policy.score(inputs), surrogate(2, inputs.hidden_states).transpose(1, 2))
