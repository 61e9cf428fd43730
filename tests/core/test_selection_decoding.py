"""The selector's decoding path: one token per push, padding hints, deferred NaN checks on accelerators."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpolicy.selection as selection
from kvpolicy import PolicyConfig, Selector, select


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 30), st.integers(0, 6), st.integers(0, 3),
       st.one_of(st.floats(-2, 2), st.just(-math.inf), st.just(math.inf)), st.integers(0, 2**31 - 1),
       st.booleans())
def test_prefill_then_one_token_pushes_equal_one_shot(batch, heads, tokens, window, sinks, threshold, seed,
                                                      give_hint):
    """A prefill push, then one token per push (with or without the ``all_valid`` hint, padding included) judges
    exactly like one-shot selection, and the report counts the same entries and prunings."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn((batch, heads, tokens), generator=gen) * 2
    valid = torch.rand((batch, tokens), generator=gen) < 0.8
    config = PolicyConfig(threshold=threshold, window=window, sinks=sinks)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    selector = Selector(config, num_layers=1)
    prefill = max(1, tokens // 2)
    judged = []

    def push(a, b):
        hint = bool(valid[:, a:b].all()) if give_hint else None
        (decision,) = selector.push(0, scores[:, :, a:b], positions[:, a:b], valid[:, a:b], all_valid=hint)
        if decision.keeps_all:  # the host-side flag never claims too much: only padding is dropped
            start = sum(k.shape[2] for k in judged)
            assert torch.equal(decision.keep, valid[:, None, start:start + decision.count].expand_as(decision.keep))
        judged.append(decision.keep)

    push(0, prefill)
    for t in range(prefill, tokens):
        push(t, t + 1)
    streamed = torch.cat(judged, dim=2)
    expected = select(scores, config, valid)[:, :, :streamed.shape[2]]
    assert torch.equal(streamed, expected)
    report = selector.report()
    assert report.entries == int(valid.sum()) * heads
    assert report.pruned == int((valid[:, None, :streamed.shape[2]] & ~streamed).sum())
    assert selector.pending(0) == min(window, tokens)


def test_nan_while_decoding_on_an_accelerator_surfaces_within_64_pushes(monkeypatch):
    """Where reading back stalls a device stream, single-token NaN checks are collected on the device and read
    every 64 pushes (and by report()): the error comes, a few steps late."""
    monkeypatch.setattr(selection, "_reads_back_cheaply", lambda tensor: False)
    one = torch.ones((1, 1), dtype=torch.bool)

    def selector_after_nan():
        sel = Selector(PolicyConfig(threshold=0.0, window=2), num_layers=1)
        sel.push(0, torch.zeros((1, 1, 4)), torch.arange(4)[None], torch.ones((1, 4), dtype=torch.bool))
        sel.push(0, torch.tensor([[[math.nan]]]), torch.tensor([[4]]), one)  # no error yet
        return sel

    with pytest.raises(ValueError, match="NaN"):
        selector_after_nan().report()
    sel = selector_after_nan()
    with pytest.raises(ValueError, match="NaN"):
        for step in range(5, 5 + selection._NAN_CHECK_EVERY):
            sel.push(0, torch.zeros((1, 1, 1)), torch.tensor([[step]]), one)
    with pytest.raises(ValueError, match="NaN"):  # a prefill push is still checked at once
        Selector(PolicyConfig(threshold=0.0), num_layers=1).push(
            0, torch.tensor([[[0.0, math.nan]]]), torch.arange(2)[None], torch.ones((1, 2), dtype=torch.bool))


def test_threshold_minus_inf_keeps_everything_without_storing_scores():
    selector = Selector(PolicyConfig(threshold=-math.inf, window=3), num_layers=1)
    one = torch.ones((2, 1), dtype=torch.bool)
    (first,) = selector.push(0, torch.randn(2, 4, 5), torch.arange(5).expand(2, 5), torch.ones((2, 5), dtype=bool))
    assert first.count == 2 and first.keep.all()
    for step in range(5, 12):
        (decision,) = selector.push(0, torch.randn(2, 4, 1), torch.full((2, 1), step), one, all_valid=True)
        assert decision.count == 1 and decision.keep.shape == (2, 4, 1) and decision.keep.all()
    assert selector.pending(0) == 3
    assert selector.report().pruned == 0 and selector.report().entries == 2 * 4 * 12


@pytest.mark.parametrize("config, scored_decoding, expected", [
    (dict(threshold=-math.inf, window=3), True, True),  # prunes nothing
    (dict(threshold=-math.inf, window=3, sinks=2), True, True),
    (dict(threshold=0.0, window=3), True, False),  # a mask from the scores, read on the device
    (dict(threshold=0.0, window=3), False, False),  # the leaving tokens are scored prefill tokens
    (dict(ratio=0.5, window=3), True, True),  # ranked modes keep every token after the prefill
    (dict(budget=2, window=3, scope="model"), True, True),
], ids=["minus-inf", "minus-inf-sinks", "threshold", "threshold-unscored", "ratio", "budget-model"])
def test_keeps_all_says_on_the_host_when_a_decoding_decision_keeps_everything(config, scored_decoding, expected):
    """``Decision.keeps_all``: True exactly when the selector knows without reading a tensor that it pruned none of
    the judged tokens; ``keep`` is then all True, or False for padding only."""
    selector = Selector(PolicyConfig(**config), num_layers=1)
    gen = torch.Generator().manual_seed(0)
    ones = torch.ones((2, 6), dtype=torch.bool)
    selector.push(0, torch.randn(2, 2, 6, generator=gen), torch.arange(6).expand(2, 6), ones)
    one = torch.ones((2, 1), dtype=torch.bool)
    for step in range(6, 9):  # the leaving tokens are the prefill's (scored)
        scores = torch.randn(2, 2, 1, generator=gen) if scored_decoding else None
        (decision,) = selector.push(0, scores, torch.full((2, 1), step), one, num_heads=2, all_valid=True)
        assert decision.count == 1 and decision.keeps_all is expected
        assert not decision.keeps_all or bool(decision.keep.all())
    for step in range(9, 12):  # the leaving tokens are decoded ones: unscored ones are kept outright
        scores = torch.randn(2, 2, 1, generator=gen) if scored_decoding else None
        (decision,) = selector.push(0, scores, torch.full((2, 1), step), one, num_heads=2, all_valid=True)
        assert decision.keeps_all is (expected or not scored_decoding)
    padded = torch.tensor([[True], [False]])
    for step in range(12, 17):  # a padding token, judged at step 15: the flag does not change, the mask does
        scores = torch.randn(2, 2, 1, generator=gen) if scored_decoding else None
        (decision,) = selector.push(0, scores, torch.full((2, 1), step), padded if step == 12 else one,
                                    num_heads=2, all_valid=step != 12)
        assert decision.keeps_all is (expected or not scored_decoding)
        if decision.keeps_all:
            assert decision.keep[:, :, 0].tolist() == ([[True] * 2, [False] * 2] if step == 15 else [[True] * 2] * 2)
