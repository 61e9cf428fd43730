"""The HF adapter's decoding fast path (pending window kept as a ring inside the store segments): entered during
plain decoding, left for chunks and padding, always the same logits as the masked reference layout."""

from __future__ import annotations

import math

import pytest
import torch

from kvpolicy.adapters.hf import PolicySession
from kvpolicy.ragged import RaggedStore
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


@pytest.mark.parametrize("config", [
    {"threshold": -1.0, "window": 6, "sinks": 2},
    {"threshold": -0.5, "window": 0},
    {"ratio": 0.6, "window": 4, "scope": "model"},
], ids=["threshold", "window-0", "ratio-model"])
def test_ring_is_entered_left_and_reentered_with_masked_logits(model, config):
    """Prefill, 8 decode steps (ring), a 5-token chunk (leaves the ring), 4 more steps (ring again): logits and
    reports equal the masked layout's at every token."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 40 + 8 + 5 + 4), generator=gen)
    chunks = [ids[:, :40]] + [ids[:, i:i + 1] for i in range(40, 48)] + [ids[:, 48:53]]
    chunks += [ids[:, i:i + 1] for i in range(53, 57)]
    policy = hash_policy(**config)
    results = {}
    for layout in ("ragged", "masked"):
        with PolicySession(model, policy, layout=layout) as session:
            results[layout] = run(model, session, chunks[:9])  # prefill + 8 steps
            if layout == "ragged":
                assert all(rows == config["window"] + 1 for rows in ring_rows(results[layout][1]))
            with torch.no_grad():
                cache = results[layout][1]
                more = [model(chunk, past_key_values=cache).logits for chunk in chunks[9:]]
                if layout == "ragged":
                    assert all(rows == config["window"] + 1 for rows in ring_rows(cache))
            results[layout] = (torch.cat([results[layout][0], *more], dim=1), cache, session.report(cache))
    (lr, cache_r, rep_r), (lm, _, rep_m) = results["ragged"], results["masked"]
    assert rep_r == rep_m and rep_r.compression > 0.2
    torch.testing.assert_close(lr, lm, rtol=1e-5, atol=1e-5)
    assert cache_r.stored_entries() == rep_r.entries - rep_r.pruned


def test_padding_still_pending_delays_the_ring(model):
    """Left padding that is still inside the window when decoding starts: the dense path runs until it has left,
    then the ring; logits equal the masked layout's throughout."""
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, VOCAB, (2, 12 + 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # 7 padding tokens, window 8: some are pending after the 12-token prefill
    chunks = [ids[:, :12]] + [ids[:, i:i + 1] for i in range(12, 22)]
    policy = hash_policy(threshold=-1.0, window=8)
    results = {}
    for layout in ("ragged", "masked"):
        with PolicySession(model, policy, layout=layout) as session:
            logits, cache = run(model, session, chunks[:2], mask)
            if layout == "ragged":
                assert ring_rows(cache) == [0, 0]  # padding pending: no ring yet
            more, seen = [], 13
            with torch.no_grad():
                for chunk in chunks[2:]:
                    seen += 1
                    more.append(model(chunk, attention_mask=mask[:, :seen], past_key_values=cache).logits)
            if layout == "ragged":
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
