"""The HF adapter's decoding fast path (pending window kept as a ring inside the store segments): entered during
plain decoding, left for chunks and padding, always the same logits as the masked reference layout."""

from __future__ import annotations

import math

import pytest
import torch

from kvpolicy.adapters.hf import PolicySession
from kvpolicy.adapters.hf.cache import PolicyLayer
from kvpolicy.ragged import RaggedStore
from kvpolicy.selection import Decision
from tests.adapters.conftest import VOCAB, hash_policy


def run(model, session, chunks, attention_mask=None):
    """Feed ``chunks`` (a list of (B, L) id tensors) one forward each; returns the concatenated logits and cache."""
    cache = session.new_cache()
    logits, seen = [], 0
    with torch.no_grad():
        for ids in chunks:
            seen += ids.shape[1]
            mask = None if attention_mask is None else attention_mask[:, :seen]
            logits.append(model(ids, attention_mask=mask, past_key_values=cache).logits)
    return torch.cat(logits, dim=1), cache


def ring_rows(cache) -> list[int]:
    return [layer._ring_rows for layer in cache.layers]


def steady_states(cache) -> list[str]:
    """Each layer's state: "ring", "tail" or "split"."""
    return ["ring" if layer._ring_rows else "tail" if layer._in_tail else "split" for layer in cache.layers]


@pytest.mark.parametrize("config, steady", [
    ({"threshold": -1.0, "window": 6, "sinks": 2}, "ring"),
    ({"threshold": -0.5, "window": 0}, "ring"),
    ({"ratio": 0.6, "window": 4, "scope": "model"}, "tail"),  # decoded tokens are all kept: nothing to prune
    ({"threshold": -math.inf, "window": 5}, "tail"),
    ({"threshold": -math.inf, "window": 0}, "tail"),
], ids=["threshold", "window-0", "ratio-model", "keep-all", "keep-all-window-0"])
def test_ring_is_entered_left_and_reentered_with_masked_logits(model, config, steady):
    """Prefill, 8 decode steps (ring, or tail when the decisions prune nothing), a 5-token chunk (leaves it), 4 more
    steps (the same state again): logits and reports equal the masked layout's at every token, and the pending
    window survives the way back to the dense block in order."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 40 + 8 + 5 + 4), generator=gen)
    chunks = [ids[:, :40]] + [ids[:, i:i + 1] for i in range(40, 48)] + [ids[:, 48:53]]
    chunks += [ids[:, i:i + 1] for i in range(53, 57)]
    policy = hash_policy(**config)
    results = {}
    for layout in ("ragged", "masked"):
        with PolicySession(model, policy, layout=layout) as session:
            results[layout] = run(model, session, chunks[:9])  # prefill + 8 steps
            cache = results[layout][1]
            if layout == "ragged":
                assert steady_states(cache) == [steady] * len(cache.layers)
                if steady == "ring":
                    assert all(rows == config["window"] + 1 for rows in ring_rows(cache))
                pending = [layer.pending_keys for layer in cache.layers]
                assert all(keys.shape[2] == config["window"] for keys in pending)
            with torch.no_grad():
                logits = [model(chunks[9], past_key_values=cache).logits]
                if layout == "ragged":
                    assert steady_states(cache) == ["split"] * len(cache.layers)
                    # The pending window came back to the dense block in order: the same keys as before the chunk,
                    # followed by the chunk's.
                    left = max(0, config["window"] - 5)  # pending tokens from before the chunk still pending
                    for before, layer in zip(pending, cache.layers):
                        torch.testing.assert_close(layer.pending_keys[:, :, :left],
                                                   before[:, :, config["window"] - left:], rtol=0, atol=0)
                logits += [model(chunk, past_key_values=cache).logits for chunk in chunks[10:]]
                if layout == "ragged":
                    assert steady_states(cache) == [steady] * len(cache.layers)
                    if steady == "ring":
                        assert all(rows == config["window"] + 1 for rows in ring_rows(cache))
            results[layout] = (torch.cat([results[layout][0], *logits], dim=1), cache, session.report(cache))
    (lr, cache_r, rep_r), (lm, _, rep_m) = results["ragged"], results["masked"]
    assert rep_r == rep_m
    if config.get("threshold") == -math.inf:
        assert rep_r.compression == 0.0
    else:
        assert rep_r.compression > 0.2
    torch.testing.assert_close(lr, lm, rtol=1e-5, atol=1e-5)
    assert cache_r.stored_entries() == rep_r.entries - rep_r.pruned


@pytest.mark.parametrize("threshold, steady", [(-1.0, "ring"), (-math.inf, "tail")], ids=["ring", "tail"])
def test_padding_still_pending_delays_the_ring(model, threshold, steady):
    """Left padding that is still inside the window when decoding starts: the dense path runs until it has left,
    then the ring (or the tail, when nothing is pruned); logits equal the masked layout's throughout."""
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, VOCAB, (2, 12 + 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # 7 padding tokens, window 8: some are pending after the 12-token prefill
    chunks = [ids[:, :12]] + [ids[:, i:i + 1] for i in range(12, 22)]
    policy = hash_policy(threshold=threshold, window=8)
    results = {}
    for layout in ("ragged", "masked"):
        with PolicySession(model, policy, layout=layout) as session:
            logits, cache = run(model, session, chunks[:2], mask)
            if layout == "ragged":
                assert steady_states(cache) == ["split", "split"]  # padding pending: no ring (or tail) yet
            more, seen = [], 13
            with torch.no_grad():
                for chunk in chunks[2:]:
                    seen += 1
                    more.append(model(chunk, attention_mask=mask[:, :seen], past_key_values=cache).logits)
            if layout == "ragged":
                assert steady_states(cache) == [steady, steady]
                if steady == "ring":
                    assert ring_rows(cache) == [9, 9]
            results[layout] = (torch.cat([logits, *more], dim=1), session.report(cache))
    real = mask.bool()
    torch.testing.assert_close(results["ragged"][0][real], results["masked"][0][real], rtol=1e-5, atol=1e-5)
    assert results["ragged"][1] == results["masked"][1]


def test_decoding_reads_segment_lengths_back_rarely(model, monkeypatch):
    """A decoding append reads nothing back while the spare rows known on the host last: the exact check (and a
    regrow when needed) runs at most once per 8 steps and layer."""
    calls = []
    reserve = RaggedStore._reserve
    monkeypatch.setattr(RaggedStore, "_reserve", lambda self: (calls.append(1), reserve(self))[1])
    ids = torch.randint(0, VOCAB, (1, 100), generator=torch.Generator().manual_seed(2))
    steps = 64
    with PolicySession(model, hash_policy(threshold=-math.inf, window=8)) as session:
        _, cache = run(model, session, [ids[:, :36]] + [ids[:, i:i + 1] for i in range(36, 36 + steps)])
    layers = model.config.num_hidden_layers
    assert 0 < len(calls) <= layers * (steps // 8 + 1)
    report = session.report(cache)
    assert report.pruned == 0 and cache.stored_entries() == report.entries == layers * 2 * (36 + steps)


def test_padding_while_decoding_leaves_the_tail_and_comes_back(model):
    """Nothing pruned (tail state), then a decoding step where one sequence is padding: the window goes back to the
    dense block until the padding has been judged, then the tail again; logits and reports equal the masked
    layout's."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (2, 20 + 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 24] = 0  # a padding token in the middle of sequence 1's decoding
    policy = hash_policy(threshold=-math.inf, window=4)
    results, states = {}, []
    for layout in ("ragged", "masked"):
        with PolicySession(model, policy, layout=layout) as session:
            cache = session.new_cache()
            logits = []
            with torch.no_grad():
                logits.append(model(ids[:, :20], attention_mask=mask[:, :20], past_key_values=cache).logits)
                for i in range(20, 36):
                    logits.append(model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache).logits)
                    if layout == "ragged":
                        states.append(steady_states(cache)[0])
            results[layout] = (torch.cat(logits, dim=1), session.report(cache), cache)
    # Steps 20..23 decode in the tail; the padded step 24 and the 3 after it (the padding is pending) are split;
    # the step that judges it enters the tail again.
    assert states == ["tail"] * 4 + ["split"] * 4 + ["tail"] * 8
    real = mask.bool()
    torch.testing.assert_close(results["ragged"][0][real], results["masked"][0][real], rtol=1e-5, atol=1e-5)
    report = results["ragged"][1]
    assert report == results["masked"][1] and report.pruned == 0
    # Padding is no entry: the padded token's two heads were dropped, not stored.
    heads = model.config.num_key_value_heads
    assert report.entries == (2 * 36 - 1) * heads * model.config.num_hidden_layers
    assert results["ragged"][2].stored_entries() == report.entries


def test_tail_state_leaves_for_a_decision_that_prunes():
    """A layer in the tail state given a decision that is not known to keep everything (not one the selector gives
    in a steady decoding, but the layer must not depend on it): the window goes back to the dense block, the
    decision is applied there, and the ring takes over; every segment holds what it should."""
    layer = PolicyLayer("ragged", backend="torch")
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 2, 12, 4, generator=gen), torch.randn(1, 2, 12, 4, generator=gen)
    layer.update(keys[:, :, :8], values[:, :, :8])  # prefill 8, window 3: 5 judged, all kept
    layer.apply(Decision(0, 5, torch.ones(1, 2, 5, dtype=torch.bool), True))
    layer.update(keys[:, :, 8:9], values[:, :, 8:9])
    layer.apply(Decision(0, 1, torch.ones(1, 2, 1, dtype=torch.bool), True))  # steady: enters the tail
    assert layer._in_tail and torch.equal(layer.pending_keys, keys[:, :, 6:9])
    layer.update(keys[:, :, 9:10], values[:, :, 9:10])
    assert torch.equal(layer.pending_values, values[:, :, 6:10]) and layer.stored_entries() == 2 * 10
    layer.apply(Decision(0, 1, torch.tensor([[[True], [False]]]), False))  # token 6 pruned in head 1
    assert not layer._in_tail and layer._ring_rows == 4  # the ring, for decisions that prune
    assert torch.equal(layer.pending_keys, keys[:, :, 7:10])
    layer.update(keys[:, :, 10:11], values[:, :, 10:11])
    layer.apply(Decision(0, 1, torch.ones(1, 2, 1, dtype=torch.bool), True))
    expected = [list(range(8)), [0, 1, 2, 3, 4, 5, 7]]
    for head, kept in enumerate(expected):
        seg_keys, seg_values = layer.store.segment(head)
        ring = 4  # the ring's rows come first in every segment, then the kept entries
        assert torch.equal(seg_keys[ring:], keys[0, head, kept])
        assert torch.equal(seg_values[ring:], values[0, head, kept])
    assert torch.equal(layer.pending_keys, keys[:, :, 8:11])
    assert layer.stored_entries() == 8 + 7 + 2 * 3
