"""Policy scores -> per-(layer, head) selection -> token vote -> slots freed in the real SGLang pools."""

from __future__ import annotations

import pytest
import torch

from kvpolicy.adapters.sglang.config import TokenVote
from kvpolicy.adapters.sglang.scoring import RequestScorer
from kvpolicy.config import PolicyConfig
from kvpolicy.selection import select

LAYERS, HEADS = 2, 2


def scores_for(tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((LAYERS, HEADS, tokens), generator=gen)


@pytest.mark.parametrize("vote", [TokenVote.ANY, TokenVote.FRACTION])
@pytest.mark.parametrize("window, sinks", [(0, 0), (4, 0), (4, 2), (40, 0)], ids=["w0", "w4", "w4-sinks2", "w40"])
def test_prefill_decisions_match_one_shot_selection_and_vote(vote, window, sinks):
    config = PolicyConfig(threshold=0.3, window=window, sinks=sinks)
    scores = scores_for(20, seed=3)
    scorer = RequestScorer(config, LAYERS, vote=vote, min_keep_fraction=0.5)
    assert scorer.push(0, scores[0]) is None
    positions, keep = scorer.push(1, scores[1])
    judged = max(0, 20 - window)
    assert positions.tolist() == list(range(judged))
    per_head = torch.stack([select(scores[i][None], config)[0] for i in range(LAYERS)])  # (L, H, T)
    flat = per_head.reshape(LAYERS * HEADS, 20)[:, :judged]
    expected = flat.any(0) if vote is TokenVote.ANY else flat.float().mean(0) >= 0.5
    assert keep.tolist() == expected.tolist()


def test_decode_tokens_are_judged_once_when_they_leave_the_window():
    config = PolicyConfig(threshold=0.0, window=3)
    scorer = RequestScorer(config, LAYERS)
    seen = []
    all_scores = scores_for(12, seed=5)
    for t in range(12):  # one token per forward, as in decoding
        for layer in range(LAYERS):
            out = scorer.push(layer, all_scores[layer, :, t:t + 1])
        seen += out.positions.tolist()
    assert seen == list(range(9))  # each judged once, in order; the last 3 still protected


def test_first_position_offsets_a_reused_prefix():
    scorer = RequestScorer(PolicyConfig(threshold=0.0, window=0), LAYERS, first_position=30)
    scorer.push(0, torch.zeros(HEADS, 4))
    positions, keep = scorer.push(1, torch.zeros(HEADS, 4))
    assert positions.tolist() == [30, 31, 32, 33] and bool(keep.all())


def test_ratio_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        RequestScorer(PolicyConfig(ratio=0.5), LAYERS)


def test_scores_free_slots_in_real_pools():
    from tests.adapters.sglang.conftest import Harness, sglang_or_skip

    sglang_or_skip()
    config = PolicyConfig(threshold=0.5, window=4)
    h = Harness(window=config.window)
    req = h.start(list(range(1000, 1024)))
    scorer = RequestScorer(config, LAYERS)
    prefill = scores_for(24, seed=11)
    scorer.push(0, prefill[0])
    decisions = scorer.push(1, prefill[1])
    free_before = h.allocator.available_size()
    result = h.cache.prune(req, decisions.positions, decisions.keep)
    dropped = int((~decisions.keep).sum())
    assert dropped > 0 and result.freed == dropped
    assert h.allocator.available_size() == free_before + dropped
    h.audit()
    for step in range(6):  # decode: each new token judged when it leaves the window
        assert h.decode(req, 7)
        decode_scores = scores_for(1, seed=100 + step)
        scorer.push(0, decode_scores[0])
        decisions = scorer.push(1, decode_scores[1])
        h.cache.prune(req, decisions.positions, decisions.keep)
        h.audit()
    layout = h.cache.layout(req)
    assert layout.logical_len == 30
    assert layout.kept_positions()[-4:].tolist() == [26, 27, 28, 29]  # the window is intact
    h.finish(req)
    h.audit()
