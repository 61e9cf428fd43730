"""Synthetic inputs and checkpoints shared by the policy tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvpolicy.policy import LayerInputs, ModelInfo


def make_inputs(batch: int = 2, heads: int = 2, q_heads: int = 4, tokens: int = 13, dim: int = 8,
                hidden: int = 16, layer_idx: int = 0, start: int = 0, seed: int = 0) -> LayerInputs:
    """Random inputs with every optional tensor present; odd sizes on purpose."""
    gen = torch.Generator().manual_seed(seed)
    return LayerInputs(
        layer_idx=layer_idx,
        keys=torch.randn(batch, heads, tokens, dim, generator=gen),
        values=torch.randn(batch, heads, tokens, dim, generator=gen),
        positions=torch.arange(start, start + tokens),
        hidden_states=torch.randn(batch, tokens, hidden, generator=gen),
        queries=torch.randn(batch, q_heads, tokens, dim, generator=gen),
    )


def model_info(layers: int = 3, hidden: int = 16, heads: int = 2, q_heads: int = 4, dim: int = 8) -> ModelInfo:
    return ModelInfo(num_layers=layers, hidden_size=hidden, num_attention_heads=q_heads, num_kv_heads=heads,
                     head_dim=dim, model_type="synthetic")


def nvidia_tensors(kind: str, hidden: int = 16, heads: int = 2, layers: int = 3, width: int = 6,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights named exactly as NVIDIA's KVzap checkpoints name them."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        if kind == "linear":
            out[f"layers.{i}.weight"] = torch.randn(heads, hidden, generator=gen)
            out[f"layers.{i}.bias"] = torch.randn(heads, generator=gen)
        else:
            out[f"layers.{i}.0.weight"] = torch.randn(width, hidden, generator=gen)
            out[f"layers.{i}.0.bias"] = torch.randn(width, generator=gen)
            out[f"layers.{i}.2.weight"] = torch.randn(heads, width, generator=gen)
            out[f"layers.{i}.2.bias"] = torch.randn(heads, generator=gen)
    return out


def write_nvidia_checkpoint(directory: Path, kind: str, hidden: int = 16, heads: int = 2, layers: int = 3,
                            width: int = 6, seed: int = 0, tensors: dict | None = None,
                            config_overrides: dict | None = None) -> Path:
    """``config.json`` + ``model.safetensors`` as published (with the extra keys transformers writes)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "kvzap", "architectures": ["KVzapModel"], "input_dim": hidden, "output_dim": heads,
              "n_modules": layers, "hidden_dim": width if kind == "mlp" else None, "dtype": "float32",
              "transformers_version": "4.57.0", **(config_overrides or {})}
    (directory / "config.json").write_text(json.dumps(config))
    tensors = nvidia_tensors(kind, hidden, heads, layers, width, seed) if tensors is None else tensors
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
