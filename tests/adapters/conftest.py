"""Tiny random HF models built in code (no downloads) and a simple test policy."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from kvpolicy import EvictionPolicy, LayerInputs, PolicyConfig

VOCAB = 97


def tiny_model(arch: str, layers: int = 2, dtype=torch.float32):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192)
    torch.manual_seed(1234)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


@pytest.fixture(params=["qwen3", "llama"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


class HashScoreConfig(PolicyConfig):
    default_selection = {"threshold": -1.0}


class HashScorePolicy(EvictionPolicy):
    """Deterministic pseudo-random log scores from (layer, head, position): prunes differently per head and
    decodes, without depending on any policy under test."""

    config_class = HashScoreConfig
    supports_decoding = True

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        batch, heads, tokens, _ = inputs.keys.shape
        pos = inputs.positions.to(torch.float64)[None, None, :]
        head = torch.arange(heads, dtype=torch.float64)[None, :, None]
        row = torch.arange(batch, dtype=torch.float64)[:, None, None]
        u = torch.frac(torch.sin(pos * 12.9898 + head * 78.233 + row * 37.719 + inputs.layer_idx * 4.1) * 43758.5453)
        return torch.log(u.abs() + 1e-6).float().expand(batch, heads, tokens).contiguous()


def hash_policy(**config) -> HashScorePolicy:
    return HashScorePolicy(HashScoreConfig(**config))
