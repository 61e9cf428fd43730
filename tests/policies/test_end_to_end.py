"""Every built-in policy through the HF adapter on a tiny Qwen3: generation runs and something is pruned."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.surrogate import KVzapSurrogate, SurrogateConfig, save_surrogate
from tests.policies.test_kvzip_plus import IDS, eager_runner

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    cfg = transformers.Qwen3Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.1,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def surrogates(tmp_path_factory):
    root = tmp_path_factory.mktemp("surrogates")
    torch.manual_seed(1)
    for kind, width in (("linear", None), ("mlp", 8)):
        config = SurrogateConfig(model_type="kvzap", input_dim=64, output_dim=2, n_modules=2, hidden_dim=width)
        save_surrogate(KVzapSurrogate(config), root / kind)
    return root


def configs(surrogates):
    return {
        "window": {"window": 8},
        "streaming_llm": {"budget_tokens": 12},
        "random": {"window": 8},
        "knorm": {"ratio": 0.5, "window": 8},
        "snapkv": {"window": 8, "obs_window": 8},
        "kvzap_linear": {"surrogate": str(surrogates / "linear"), "threshold": 0.0, "window": 8},
        "kvzap_mlp": {"surrogate": str(surrogates / "mlp"), "threshold": 0.0, "window": 8},
        "kvzip_plus": {"window": 8, **IDS},
    }


@pytest.mark.parametrize("name", ["window", "streaming_llm", "random", "knorm", "snapkv", "kvzap_linear",
                                  "kvzap_mlp", "kvzip_plus"])
def test_generate_with_policy(model, surrogates, name):
    context = torch.randint(11, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    with kvpolicy.apply(model, name, **configs(surrogates)[name]) as session:
        out = model.generate(context, max_new_tokens=4, do_sample=False)
        report = session.report()
    assert out.shape == (1, 44)
    assert 0.0 < report.compression < 1.0


def test_production_runner_agrees_with_test_runner(model):
    """The adapter's oracle runner and the eager test runner give the same kvzip_plus scores."""
    from kvpolicy.adapters.hf import PolicySession

    context = torch.randint(11, 64, (1, 30), generator=torch.Generator().manual_seed(1))
    policy = kvpolicy.get_policy("kvzip_plus", chunk_size=12, **IDS)
    with PolicySession(model, policy) as session:
        ours = policy.compute_scores(session.oracle_runner(), context)
    eager = transformers.Qwen3ForCausalLM(model.config.__class__(**{**model.config.to_dict(),
                                                                     "attn_implementation": "eager"})).eval()
    eager.load_state_dict(model.state_dict())
    ref = policy.compute_scores(eager_runner(eager), context)
    for layer in ours:
        torch.testing.assert_close(ours[layer], ref[layer], atol=1e-4, rtol=0)
