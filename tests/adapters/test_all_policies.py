"""Every built-in policy, loaded by name, runs through the HF adapter on tiny Qwen3 and Llama models:
it prunes, frees bytes, and the ragged cache gives the same logits as masking the same entries."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.adapters.hf import PolicySession
from kvpolicy.surrogate import KVzapSurrogate, SurrogateConfig, save_surrogate
from tests.adapters.conftest import VOCAB

BUILTINS = ["window", "streaming_llm", "random", "knorm", "snapkv", "kvzap_linear", "kvzap_mlp", "kvzip_plus"]


@pytest.fixture(scope="module")
def surrogates(tmp_path_factory):
    out = {}
    for kind, hidden_dim in (("linear", None), ("mlp", 8)):
        torch.manual_seed(7)
        surrogate = KVzapSurrogate(SurrogateConfig(model_type="kvzap", input_dim=64, output_dim=2, n_modules=2,
                                                   hidden_dim=hidden_dim))
        out[kind] = save_surrogate(surrogate, tmp_path_factory.mktemp(f"kvzap_{kind}"))
    return out


def policy_config(name: str, surrogates) -> dict:
    window = {"window": 8}
    return {
        "window": window,
        "streaming_llm": {"budget_tokens": 16, "sinks": 2},
        "random": {"threshold": -0.7, **window},
        "knorm": {"ratio": 0.5, **window},
        "snapkv": {"ratio": 0.5, "obs_window": 8, **window},
        "kvzap_linear": {"surrogate": str(surrogates["linear"]), "threshold": 0.0, **window},
        "kvzap_mlp": {"surrogate": str(surrogates["mlp"]), "threshold": 0.0, **window},
        # Token ids for the repeat prompts: the tiny model has no tokenizer. chunk_size < context: chunked.
        "kvzip_plus": {"ratio": 0.5, "chunk_size": 24, "repeat_prompt_ids": [1, 2, 3],
                       "continue_prompt_ids": [4, 5], "prompt_suffix_ids": [6], **window},
    }[name]


def test_builtins_are_registered():
    assert set(BUILTINS) <= set(kvpolicy.available_policies())


@pytest.mark.parametrize("name", BUILTINS)
def test_policy_runs_through_adapter(model, name, surrogates):
    policy = kvpolicy.get_policy(name, **policy_config(name, surrogates))
    ids = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(11))
    results = {}
    for layout in ("ragged", "masked"):
        with PolicySession(model, policy, layout=layout) as session:
            cache = session.new_cache()
            with torch.no_grad():
                logits = [model(ids, past_key_values=cache).logits]
                for _ in range(6):
                    logits.append(model(logits[-1][:, -1:].argmax(-1), past_key_values=cache).logits)
            results[layout] = (torch.cat(logits, dim=1), session.report(cache), session.kv_bytes(cache),
                               session.full_kv_bytes(cache))
    (lr, report, held, full), (lm, report_m, _, _) = results["ragged"], results["masked"]
    assert report == report_m
    assert 0.2 < report.compression < 1.0, report
    assert held < full
    torch.testing.assert_close(lr, lm, rtol=1e-5, atol=1e-5)


def test_generate_with_each_decoding_policy(model, surrogates):
    """Policies that judge decoded tokens keep pruning during generate()."""
    ids = torch.randint(1, VOCAB, (1, 30))  # no pad id (0): generate() would treat it as padding
    for name in BUILTINS:
        policy = kvpolicy.get_policy(name, **policy_config(name, surrogates))
        if not policy.supports_decoding:
            continue
        with kvpolicy.apply(model, policy) as session:
            out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
            report = session.report()
        # Every token written to the cache (all but the last generated one) is counted, per layer and head.
        assert out.shape[1] > 60
        assert report.entries == 2 * 2 * (out.shape[1] - 1), name
        assert report.pruned > 0, name
