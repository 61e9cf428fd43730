"""window, streaming_llm, random, knorm, snapkv: contract, known answers and config validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import kvpolicy
from kvpolicy.policies.knorm import KNormConfig, KNormPolicy
from kvpolicy.policies.random import RandomPolicy
from kvpolicy.policies.snapkv import SnapKVConfig, SnapKVPolicy
from kvpolicy.policies.streaming_llm import StreamingLLMConfig, StreamingLLMPolicy
from kvpolicy.policies.window import WindowPolicy
from kvpolicy.selection import select
from tests.policies.helpers import make_inputs

BASELINES = {
    "window": {},
    "streaming_llm": {"budget_tokens": 8},
    "random": {"seed": 3},
    "knorm": {},
    "snapkv": {"obs_window": 4, "kernel_size": 3},
}


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("tokens", [1, 13, 64], ids=lambda t: f"T{t}")
def test_contract(name, tokens):
    policy = kvpolicy.get_policy(name, **BASELINES[name])
    inputs = make_inputs(tokens=tokens)
    before = {k: getattr(inputs, k).clone() for k in ("keys", "values", "hidden_states", "queries")}
    scores = policy.score(inputs)
    assert scores.shape == (2, 2, tokens) and scores.dtype == torch.float32
    assert not torch.isnan(scores).any()
    assert torch.equal(scores, policy.score(inputs)), "scores must be deterministic"
    for k, v in before.items():
        assert torch.equal(getattr(inputs, k), v), f"score() modified {k}"


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize(("bad", "field"), [
    ({"threshold": math.nan}, "threshold"),
    ({"sinks": -1}, "sinks"),
    ({"ratio": 1.0}, "ratio"),
    ({"no_such_field": 1}, "no_such_field"),
], ids=lambda v: str(v))
def test_config_errors_name_the_field(name, bad, field):
    cls = kvpolicy.get_policy_class(name)
    with pytest.raises(ValidationError) as err:
        cls.config_class(**{**BASELINES[name], **bad})
    assert field in str(err.value)


@pytest.mark.parametrize("name", sorted(set(BASELINES) - {"streaming_llm"}))
def test_negative_window_rejected(name):
    with pytest.raises(ValidationError, match="window"):
        kvpolicy.get_policy_class(name).config_class(**BASELINES[name], window=-1)


def test_decoding_flags():
    assert WindowPolicy.supports_decoding and StreamingLLMPolicy.supports_decoding
    assert RandomPolicy.supports_decoding and KNormPolicy.supports_decoding
    assert not SnapKVPolicy.supports_decoding and SnapKVPolicy.captures == {"queries"}


# -- window / streaming_llm --------------------------------------------------------------------------------
def test_window_scores_all_minus_inf_and_keeps_sinks_and_window():
    policy = kvpolicy.get_policy("window", window=3, sinks=2)
    scores = policy.score(make_inputs(tokens=10))
    assert torch.isneginf(scores).all()
    keep = select(scores, policy.config)
    expected = torch.tensor([True, True] + [False] * 5 + [True] * 3)
    assert torch.equal(keep, expected.expand_as(keep))


def test_streaming_llm_keeps_exactly_the_budget():
    policy = kvpolicy.get_policy("streaming_llm", budget_tokens=7, sinks=3)
    assert policy.config.window == 4 and policy.config.sinks == 3
    keep = select(policy.score(make_inputs(tokens=20)), policy.config)
    assert (keep.sum(-1) == 7).all()
    assert keep[..., :3].all() and keep[..., -4:].all()


def test_streaming_llm_default_sinks():
    assert StreamingLLMConfig(budget_tokens=5).sinks == 4
    assert StreamingLLMConfig(budget_tokens=5).window == 1


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"budget_tokens": 4}, "budget_tokens"),  # == default sinks: no room for a window
    ({"budget_tokens": 3, "sinks": 5}, "budget_tokens"),
    ({"budget_tokens": 0}, "budget_tokens"),
    ({"budget_tokens": 8, "window": 4}, "window"),
    ({"budget_tokens": 8, "ratio": 0.5}, "ratio"),
    ({"budget_tokens": 8, "budget": 5}, "budget"),
    ({"budget_tokens": 8, "threshold": -math.inf}, "threshold"),
    ({}, "budget_tokens"),
], ids=lambda v: str(v))
def test_streaming_llm_validation(kwargs, field):
    with pytest.raises(ValidationError) as err:
        StreamingLLMConfig(**kwargs)
    assert field in str(err.value)


# -- random -------------------------------------------------------------------------------------------------
def test_random_reproducible_and_seeded():
    inputs = make_inputs(tokens=50)
    a = kvpolicy.get_policy("random", seed=1).score(inputs)
    assert torch.equal(a, kvpolicy.get_policy("random", seed=1).score(inputs))  # a fresh instance agrees
    assert not torch.equal(a, kvpolicy.get_policy("random", seed=2).score(inputs))
    other_layer = make_inputs(tokens=50, layer_idx=1)
    assert not torch.equal(a, kvpolicy.get_policy("random", seed=1).score(other_layer))
    later = make_inputs(tokens=50, start=50)
    assert not torch.equal(a, kvpolicy.get_policy("random", seed=1).score(later))
    assert (a <= 0).all()


def test_random_default_threshold_prunes_about_half():
    policy = kvpolicy.get_policy("random", window=0)
    assert policy.config.threshold == pytest.approx(-math.log(2))
    keep = select(policy.score(make_inputs(batch=1, tokens=4000)), policy.config)
    assert 0.45 < keep.float().mean() < 0.55


# -- knorm --------------------------------------------------------------------------------------------------
def test_knorm_known_answer():
    inputs = make_inputs(tokens=9)
    scores = kvpolicy.get_policy("knorm").score(inputs)
    torch.testing.assert_close(scores, -torch.linalg.vector_norm(inputs.keys, dim=-1))
    keys = torch.zeros(1, 1, 3, 4)
    keys[0, 0, :, 0] = torch.tensor([3.0, 1.0, 2.0])
    small = make_inputs(batch=1, heads=1, tokens=3, dim=4)
    small = type(small)(layer_idx=0, keys=keys, values=small.values, positions=small.positions)
    order = kvpolicy.get_policy("knorm").score(small)[0, 0].argsort(descending=True)
    assert order.tolist() == [1, 2, 0]  # smallest key norm first
    assert KNormConfig().ratio == 0.5


# -- snapkv -------------------------------------------------------------------------------------------------
def snapkv_reference(queries, keys, obs_window, kernel_size, pooling):
    """Loop-by-loop restatement of the SnapKV score for the tests."""
    batch, q_heads, tokens, dim = queries.shape
    heads = keys.shape[1]
    group = q_heads // heads
    w = min(obs_window, tokens)
    out = torch.full((batch, heads, tokens), -math.inf)
    for b in range(batch):
        for h in range(heads):
            for g in range(group):
                q = h * group + g
                avg = torch.zeros(tokens, dtype=torch.float64)
                for t in range(tokens - w, tokens):
                    logits = (keys[b, h, : t + 1].double() @ queries[b, q, t].double()) / math.sqrt(dim)
                    avg[: t + 1] += torch.softmax(logits, 0) / w
                pooled = torch.empty(tokens, dtype=torch.float64)
                r = kernel_size // 2
                for i in range(tokens):
                    window = avg[max(0, i - r): i + r + 1]
                    pooled[i] = window.max() if pooling == "max" else window.mean()
                out[b, h] = torch.maximum(out[b, h], pooled.clamp_min(1e-30).log().float())
    return out


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize(("tokens", "obs_window", "kernel"), [(11, 4, 3), (7, 32, 5), (5, 2, 1)],
                         ids=lambda v: str(v))
def test_snapkv_matches_reference(pooling, tokens, obs_window, kernel):
    inputs = make_inputs(tokens=tokens, seed=5)
    policy = kvpolicy.get_policy("snapkv", obs_window=obs_window, kernel_size=kernel, pooling=pooling)
    expected = snapkv_reference(inputs.queries, inputs.keys, obs_window, kernel, pooling)
    torch.testing.assert_close(policy.score(inputs), expected, rtol=1e-5, atol=1e-5)


def test_snapkv_needs_queries_and_odd_kernel():
    inputs = make_inputs()
    no_queries = type(inputs)(layer_idx=0, keys=inputs.keys, values=inputs.values, positions=inputs.positions)
    with pytest.raises(ValueError, match="queries"):
        kvpolicy.get_policy("snapkv").score(no_queries)
    with pytest.raises(ValidationError, match="kernel_size"):
        SnapKVConfig(kernel_size=4)
    with pytest.raises(ValidationError, match="obs_window"):
        SnapKVConfig(obs_window=0)


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 40), seed=st.integers(0, 2**16), name=st.sampled_from(sorted(BASELINES)))
def test_scores_never_nan_and_at_most_zero_for_log_probabilities(tokens, seed, name):
    scores = kvpolicy.get_policy(name, **BASELINES[name]).score(make_inputs(tokens=tokens, seed=seed))
    assert not torch.isnan(scores).any()
    if name in ("snapkv", "random", "window", "streaming_llm"):  # logs of probabilities / -inf
        assert (scores <= 1e-6).all()
