"""The HF adapter on tiny random Qwen3 and Llama models: exactness, real memory savings, positions, errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from kvpolicy.adapters.hf import PolicySession, apply
from tests.adapters.conftest import VOCAB, hash_policy, tiny_model

DECODE_STEPS = 24


def run_steps(model, session, input_ids, attention_mask=None, steps=DECODE_STEPS):
    """Prefill then greedy decode with an explicit cache; returns (logits (B, T+steps, V), cache)."""
    cache = session.new_cache()
    logits = []
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, past_key_values=cache)
        logits.append(out.logits)
        mask = attention_mask
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(nxt, attention_mask=mask, past_key_values=cache)
            logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


def padded_batch(batch=2, tokens=48, pad=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, tokens), generator=gen)
    mask = torch.ones((batch, tokens), dtype=torch.long)
    mask[0, :pad] = 0  # left padding on the first row
    return ids, mask


@pytest.mark.parametrize("config", [
    {"threshold": -1.0, "window": 8, "sinks": 2},
    {"threshold": -0.5, "window": 0},
    {"ratio": 0.6, "window": 4},
    {"budget": 12, "window": 4, "scope": "layer"},
    {"ratio": 0.5, "window": 4, "scope": "model"},
], ids=["threshold", "threshold-no-window", "ratio", "budget-layer", "ratio-model"])
def test_compacted_attention_equals_masked_attention(model, config):
    """Attention over the ragged (really compacted) cache == attention with the same entries masked, for the
    prefill and 24 decoding steps, with left padding."""
    ids, mask = padded_batch()
    policy = hash_policy(**config)
    results = {}
    for layout in ("ragged", "masked"):
        with PolicySession(model, policy, layout=layout) as session:
            logits, cache = run_steps(model, session, ids, mask)
            results[layout] = (logits, session.report(cache))
    (lr, rep_r), (lm, rep_m) = results["ragged"], results["masked"]
    assert rep_r == rep_m
    assert rep_r.compression > 0.2  # the test is only meaningful if entries really were pruned
    torch.testing.assert_close(lr, lm, rtol=1e-5, atol=1e-5)


def test_prune_nothing_is_identical_to_plain_model(model):
    """threshold=-inf prunes nothing: logits match the stock model and greedy generations are identical."""
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config)).logits
        gen_ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with apply(model, hash_policy(threshold=-math.inf)) as session:
        with torch.no_grad():
            got = model(ids, attention_mask=mask).logits
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert session.report().compression == 0.0
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gen_ref)


def test_memory_is_really_freed(model):
    """Bytes held after compression == kept fraction × full cache bytes (+ per-segment metadata only)."""
    ids = torch.randint(0, VOCAB, (2, 300), generator=torch.Generator().manual_seed(3))
    with PolicySession(model, hash_policy(threshold=-0.7, window=16)) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(ids, past_key_values=cache)
        report = session.report(cache)
        full = session.full_kv_bytes(cache)
        held = session.kv_bytes(cache)
    segments = 2 * model.config.num_key_value_heads
    metadata = model.config.num_hidden_layers * 3 * segments * 8  # starts, lengths, capacities (int64)
    assert 0.3 < report.compression < 0.9
    expected = full * report.kept_fraction
    assert abs(held - expected) <= metadata
    assert cache.stored_entries() == report.entries - report.pruned


def test_masked_layout_frees_nothing(model):
    ids = torch.randint(0, VOCAB, (1, 200))
    with PolicySession(model, hash_policy(threshold=-0.7, window=16), layout="masked") as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(ids, past_key_values=cache)
        assert session.report(cache).compression > 0.3
        assert session.kv_bytes(cache) == session.full_kv_bytes(cache)


def test_new_tokens_keep_original_positions(model):
    """After pruning, the cache still reports every token seen, so HF gives new tokens their original absolute
    positions; the pruned cache holds fewer entries than that."""
    ids = torch.randint(0, VOCAB, (1, 64))
    with PolicySession(model, hash_policy(threshold=0.0, window=4)) as session:  # prunes almost everything
        logits, cache = run_steps(model, session, ids, steps=5)
        assert cache.get_seq_length() == 64 + 5
        assert cache.layers[0].store.lengths.max() < 20
    # Reference: the same decisions applied by masking, where positions are trivially the original ones.
    with PolicySession(model, hash_policy(threshold=0.0, window=4), layout="masked") as session:
        ref, _ = run_steps(model, session, ids, steps=5)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_session_restores_model_and_generate_works(model):
    before = model.config._attn_implementation
    ids = torch.randint(0, VOCAB, (1, 40))
    with apply(model, hash_policy(threshold=-1.0, window=8)) as session:
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 46)
        assert 0 < session.report().compression < 1
        assert session.kv_bytes() < session.full_kv_bytes()
    assert model.config._attn_implementation == before
    with torch.no_grad():
        model(ids)  # plain forward works again after detaching


def test_beam_search_is_refused_clearly(model):
    ids = torch.randint(0, VOCAB, (1, 10))
    with apply(model, hash_policy(threshold=-1.0, window=4)):
        with pytest.raises(NotImplementedError, match="beam search"):
            model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)


def test_prefilled_foreign_cache_is_refused(model):
    ids = torch.randint(0, VOCAB, (1, 10))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    with apply(model, hash_policy(threshold=-1.0)):
        with pytest.raises(ValueError, match="non-empty cache not created by kvpolicy"):
            model(ids[:, :1], past_key_values=cache)


def test_unsupported_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        PolicySession(gpt2, hash_policy(threshold=0.0))


def test_bf16_runs_and_stays_close():
    model = tiny_model("qwen3", dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 64))
    results = {}
    for layout in ("ragged", "masked"):
        with PolicySession(model, hash_policy(threshold=-1.0, window=8), layout=layout) as session:
            results[layout], cache = run_steps(model, session, ids, steps=4)
    torch.testing.assert_close(results["ragged"].float(), results["masked"].float(), rtol=2e-2, atol=2e-2)
