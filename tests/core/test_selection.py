"""Properties of scores → keep decisions (window, sinks, threshold, ratio, budget, streaming judgement)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy import PolicyConfig, Selector, select
from kvpolicy.selection import top_entries

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def score_tensors(draw, max_tokens=40):
    batch = draw(st.integers(1, 2))
    heads = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, max_tokens))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn((batch, heads, tokens), generator=gen) * 3
    # Sprinkle -inf entries: policies may return them.
    scores[torch.rand(scores.shape, generator=gen) < 0.1] = -math.inf
    return scores


windows = st.integers(0, 12)
sinks_st = st.integers(0, 5)
thresholds = st.one_of(st.floats(-6, 6), st.sampled_from([-math.inf, math.inf]))


@SETTINGS
@given(score_tensors(), windows, sinks_st, thresholds)
def test_window_and_sinks_never_pruned(scores, window, sinks, threshold):
    keep = select(scores, PolicyConfig(threshold=threshold, window=window, sinks=sinks))
    tokens = scores.shape[2]
    assert keep[:, :, max(0, tokens - window):].all()
    assert keep[:, :, :sinks].all()


@SETTINGS
@given(score_tensors(), windows, sinks_st, st.floats(-6, 6), st.floats(0, 6))
def test_raising_threshold_never_keeps_more(scores, window, sinks, low, delta):
    keep_low = select(scores, PolicyConfig(threshold=low, window=window, sinks=sinks))
    keep_high = select(scores, PolicyConfig(threshold=low + delta, window=window, sinks=sinks))
    assert not (keep_high & ~keep_low).any()


@SETTINGS
@given(score_tensors(), windows, sinks_st, st.floats(-6, 6))
def test_threshold_is_strict_and_exact(scores, window, sinks, threshold):
    keep = select(scores, PolicyConfig(threshold=threshold, window=window, sinks=sinks))
    tokens = scores.shape[2]
    judged = torch.zeros(tokens, dtype=torch.bool)
    judged[sinks: max(sinks, tokens - window)] = True
    expected = torch.where(judged, scores >= threshold, torch.ones_like(keep))
    assert torch.equal(keep, expected)
    # An entry whose score equals the threshold is kept (prune only when score < threshold).
    if judged.any():
        first = int(judged.nonzero()[0])
        tied = scores.clone()
        tied[..., first] = threshold
        assert select(tied, PolicyConfig(threshold=threshold, window=window, sinks=sinks))[..., first].all()


@SETTINGS
@given(score_tensors(), windows, sinks_st)
def test_infinite_thresholds(scores, window, sinks):
    tokens = scores.shape[2]
    protected = torch.zeros(tokens, dtype=torch.bool)
    protected[:sinks] = True
    protected[max(0, tokens - window):] = True
    assert select(scores, PolicyConfig(threshold=-math.inf, window=window, sinks=sinks)).all()
    keep_inf = select(scores, PolicyConfig(threshold=math.inf, window=window, sinks=sinks))
    assert torch.equal(keep_inf, protected.expand_as(keep_inf))


@SETTINGS
@given(score_tensors(), windows, sinks_st, st.floats(0, 0.99))
def test_ratio_keeps_exactly_the_top_scored(scores, window, sinks, ratio):
    scores = torch.nan_to_num(scores, neginf=-50.0)
    scores = scores + torch.arange(scores.shape[2]) * 1e-4  # distinct scores: the top set is unique
    keep = select(scores, PolicyConfig(ratio=ratio, window=window, sinks=sinks))
    batch, heads, tokens = scores.shape
    protected = torch.zeros(tokens, dtype=torch.bool)
    protected[:sinks] = True
    protected[max(0, tokens - window):] = True
    n_keep = math.floor(tokens * (1 - ratio))
    free = max(0, n_keep - int(protected.sum()))
    for b in range(batch):
        for h in range(heads):
            k = keep[b, h]
            assert k[protected].all()
            assert int(k.sum()) == max(n_keep, int(protected.sum()))
            others = scores[b, h][~protected]
            top = torch.topk(others, k=min(free, len(others))).values
            kept_others = scores[b, h][k & ~protected]
            assert torch.equal(torch.sort(kept_others).values, torch.sort(top).values)


@SETTINGS
@given(score_tensors(), st.integers(1, 30), windows)
def test_budget_keeps_at_most_budget_per_head(scores, budget, window):
    keep = select(scores, PolicyConfig(budget=budget, window=window))
    tokens = scores.shape[2]
    protected = min(window, tokens)
    counts = keep.sum(dim=2)
    assert (counts == max(min(budget, tokens), protected)).all()


@SETTINGS
@given(score_tensors(), st.floats(0, 0.95), windows)
def test_layer_scope_shares_the_quota_across_heads(scores, ratio, window):
    keep = select(scores, PolicyConfig(ratio=ratio, window=window, scope="layer"))
    batch, heads, tokens = scores.shape
    quota = math.floor(heads * tokens * (1 - ratio))
    protected = heads * min(window, tokens)
    assert (keep.sum(dim=(1, 2)) == max(quota, protected)).all()


@SETTINGS
@given(score_tensors(max_tokens=30), windows, sinks_st, st.floats(-3, 3),
       st.lists(st.integers(1, 7), min_size=1, max_size=12))
def test_streaming_judges_each_token_once_like_one_shot(scores, window, sinks, threshold, chunks):
    """Pushing tokens in arbitrary chunks (prefill then decoding) judges every token exactly once, when it
    leaves the window, with the same result as judging the whole sequence at once."""
    batch, heads, tokens = scores.shape
    config = PolicyConfig(threshold=threshold, window=window, sinks=sinks)
    selector = Selector(config, num_layers=1)
    judged_keep, pos, step = [], 0, 0
    while pos < tokens:
        n = min(chunks[step % len(chunks)], tokens - pos)
        step += 1
        positions = torch.arange(pos, pos + n).expand(batch, n)
        valid = torch.ones((batch, n), dtype=torch.bool)
        (decision,) = selector.push(0, scores[:, :, pos:pos + n], positions, valid)
        pos += n
        # Everything older than the window is judged by now, nothing newer.
        assert sum(k.shape[2] for k in judged_keep) + decision.count == max(0, pos - window)
        judged_keep.append(decision.keep)
    assert selector.pending(0) == min(window, tokens)
    streamed = torch.cat(judged_keep, dim=2)
    one_shot = select(scores, config)
    assert torch.equal(streamed, one_shot[:, :, : streamed.shape[2]])
    report = selector.report()
    assert report.entries == batch * heads * tokens
    assert report.pruned == int((~streamed).sum())


def test_unscored_tokens_are_kept_and_padding_never():
    config = PolicyConfig(threshold=0.0, window=1)
    selector = Selector(config, num_layers=1)
    valid = torch.tensor([[False, True, True]])
    (d,) = selector.push(0, torch.full((1, 1, 3), -5.0), torch.tensor([[0, 0, 1]]), valid)
    assert d.count == 2 and not d.keep.any()  # padding dropped, real token pruned by score
    one = torch.ones((1, 1), dtype=torch.bool)
    (d,) = selector.push(0, None, torch.tensor([[2]]), one, num_heads=1)
    assert d.count == 1 and not d.keep.any()  # the scored token (-5) leaves the window: pruned
    (d,) = selector.push(0, None, torch.tensor([[3]]), one, num_heads=1)
    assert d.count == 1 and d.keep.all()  # the unscored token leaves the window: kept
    report = selector.report()
    assert report.entries == 4 and report.pruned == 2  # padding neither counted nor kept


def test_model_scope_ranks_across_layers():
    config = PolicyConfig(ratio=0.5, window=0, scope="model")
    selector = Selector(config, num_layers=2)
    low = torch.zeros((1, 1, 4))
    high = torch.ones((1, 1, 4))
    pos = torch.arange(4)[None]
    valid = torch.ones((1, 4), dtype=torch.bool)
    assert selector.push(0, low, pos, valid) == []  # waits for the last layer
    decisions = {d.layer_idx: d for d in selector.push(1, high, pos, valid)}
    assert not decisions[0].keep.any() and decisions[1].keep.all()
    assert selector.report().compression == 0.5


def test_top_entries_ties_and_candidates():
    scores = torch.tensor([[1.0, 1.0, -math.inf, 5.0]])
    cand = torch.tensor([[True, True, True, False]])
    chosen = top_entries(scores, cand, torch.tensor([2]))
    assert chosen.tolist() == [[True, True, False, False]]
    chosen = top_entries(scores, cand, torch.tensor([10]))
    assert chosen.tolist() == [[True, True, True, False]]


def test_nan_scores_rejected():
    selector = Selector(PolicyConfig(threshold=0.0), num_layers=1)
    with pytest.raises(ValueError, match="NaN"):
        selector.push(0, torch.tensor([[[float("nan")]]]), torch.zeros((1, 1), dtype=torch.long),
                      torch.ones((1, 1), dtype=torch.bool))
