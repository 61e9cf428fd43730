"""KVzap surrogates: the per-layer model that predicts log KVzip+ scores from hidden states.

A surrogate has one small module per decoder layer mapping the attention-layer input ``h`` (after the input
norm, ``hidden`` wide) to one log score per KV head:

- linear: ``Linear(hidden -> kv_heads)``
- MLP: ``Linear(hidden -> hidden_dim) -> GELU (exact erf form) -> Linear(hidden_dim -> kv_heads)``

On disk it uses NVIDIA's published KVzap layout, so a checkpoint downloaded from the hub (or written by
kvpress's ``KVzapModel.save_pretrained``) loads as is:

- ``config.json``: ``{"model_type": "kvzap", "input_dim": hidden, "output_dim": kv_heads,
  "n_modules": layers, "hidden_dim": null | width, ...}`` (other keys are ignored);
- ``model.safetensors``: ``layers.{i}.weight (kv_heads, hidden)``, ``layers.{i}.bias (kv_heads,)`` for linear;
  ``layers.{i}.0.weight (hidden_dim, hidden)``, ``layers.{i}.0.bias``, ``layers.{i}.2.weight
  (kv_heads, hidden_dim)``, ``layers.{i}.2.bias`` for the MLP.

Only safetensors are read: pickle-based files (``*.bin``, ``*.pt``) are never loaded.

Fitting lives in the lab (:mod:`kvpolicy.lab.fit`); this module only defines, loads and saves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class SurrogateConfig(BaseModel):
    """The fields of a KVzap ``config.json`` this package uses (unknown keys are ignored)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    model_type: Literal["kvzap"]
    input_dim: int = Field(ge=1)  # model hidden size
    output_dim: int = Field(ge=1)  # KV heads
    n_modules: int = Field(ge=1)  # decoder layers
    hidden_dim: int | None = Field(default=None, ge=1)  # None: linear surrogate

    @property
    def kind(self) -> Literal["linear", "mlp"]:
        return "linear" if self.hidden_dim is None else "mlp"


class SurrogateFormatError(ValueError):
    """A surrogate directory that does not follow the KVzap layout (message names the file or tensor)."""


def _layer_module(config: SurrogateConfig) -> nn.Module:
    if config.hidden_dim is None:
        return nn.Linear(config.input_dim, config.output_dim)
    return nn.Sequential(
        nn.Linear(config.input_dim, config.hidden_dim),
        nn.GELU(approximate="none"),
        nn.Linear(config.hidden_dim, config.output_dim),
    )


class KVzapSurrogate(nn.Module):
    """One module per layer; ``forward(layer_idx, hidden (..., hidden)) -> (..., kv_heads)`` log scores."""

    def __init__(self, config: SurrogateConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(_layer_module(config) for _ in range(config.n_modules))

    @property
    def kind(self) -> Literal["linear", "mlp"]:
        return self.config.kind

    def forward(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers[layer_idx](hidden)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, in NVIDIA's layout."""
        return expected_shapes(self.config)


def expected_shapes(config: SurrogateConfig) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(config.n_modules):
        if config.hidden_dim is None:
            shapes[f"layers.{i}.weight"] = (config.output_dim, config.input_dim)
            shapes[f"layers.{i}.bias"] = (config.output_dim,)
        else:
            shapes[f"layers.{i}.0.weight"] = (config.hidden_dim, config.input_dim)
            shapes[f"layers.{i}.0.bias"] = (config.hidden_dim,)
            shapes[f"layers.{i}.2.weight"] = (config.output_dim, config.hidden_dim)
            shapes[f"layers.{i}.2.bias"] = (config.output_dim,)
    return shapes


def _read_config(directory: Path) -> SurrogateConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise SurrogateFormatError(f"{directory}: no {CONFIG_FILE} (expected a KVzap surrogate directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SurrogateFormatError(f"{path}: not valid JSON ({exc})") from exc
    try:
        return SurrogateConfig.model_validate(raw)
    except ValidationError as exc:
        raise SurrogateFormatError(f"{path}: not a KVzap surrogate config: {exc}") from exc


def _checked_tensor(weights: Path, name: str, tensor: torch.Tensor, shape: tuple[int, ...],
                    config: SurrogateConfig, dtype: torch.dtype) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise SurrogateFormatError(
            f"{weights}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape} "
            f"(config: input_dim={config.input_dim}, output_dim={config.output_dim}, hidden_dim={config.hidden_dim})"
        )
    if not tensor.is_floating_point():
        raise SurrogateFormatError(f"{weights}: tensor {name!r} has dtype {tensor.dtype}, expected a float")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise SurrogateFormatError(f"{weights}: tensor {name!r} has {bad} NaN or infinite values; a "
                                   "surrogate must have finite weights")
    return tensor.to(dtype)


def load_surrogate(path: str | Path, *, dtype: torch.dtype = torch.float32) -> KVzapSurrogate:
    """Load a KVzap surrogate directory (NVIDIA's layout) with safetensors only.

    Raises :class:`SurrogateFormatError` (a ValueError) naming the file or tensor when something is missing,
    misshapen, unexpected or unreadable (an empty or truncated ``model.safetensors``), and FileNotFoundError
    when ``path`` is not a directory. Weights are cast to ``dtype`` (float32 by default: scores are compared
    with thresholds, keep them precise).
    """
    from safetensors import SafetensorError, safe_open

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"KVzap surrogate directory {directory} does not exist")
    config = _read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = (f"; found {pickles}, which is pickle-based and never loaded (convert it to safetensors)"
                if pickles else "")
        raise SurrogateFormatError(f"{directory}: no {WEIGHTS_FILE}{hint}")
    shapes = expected_shapes(config)
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            present = set(f.keys())
            for name, shape in shapes.items():
                if name not in present:
                    raise SurrogateFormatError(
                        f"{weights}: missing tensor {name!r} (expected shape {shape} for a {config.kind} "
                        f"surrogate with {config.n_modules} layers)"
                    )
                state[name] = _checked_tensor(weights, name, f.get_tensor(name), shape, config, dtype)
    except (SafetensorError, OSError) as exc:  # empty, truncated or unreadable: safetensors names no file
        raise SurrogateFormatError(f"{weights}: not a readable safetensors file ({exc}); the file is empty, "
                                   "truncated or corrupt: download or save it again") from exc
    unexpected = sorted(present - set(shapes))
    if unexpected:
        raise SurrogateFormatError(
            f"{weights}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} for a "
            f"{config.kind} surrogate with {config.n_modules} layers (is config.json from another checkpoint?)"
        )
    surrogate = KVzapSurrogate(config).to(dtype)
    surrogate.load_state_dict(state, strict=True)
    return surrogate.eval().requires_grad_(False)


def save_surrogate(surrogate: KVzapSurrogate, path: str | Path) -> Path:
    """Write ``surrogate`` as ``config.json`` + ``model.safetensors`` in NVIDIA's KVzap layout."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = surrogate.config
    weights = next(surrogate.parameters())
    config = {
        "model_type": "kvzap",
        "architectures": ["KVzapModel"],
        "input_dim": cfg.input_dim,
        "output_dim": cfg.output_dim,
        "n_modules": cfg.n_modules,
        "hidden_dim": cfg.hidden_dim,
        "dtype": str(weights.dtype).removeprefix("torch."),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {name: t.detach().cpu().contiguous() for name, t in surrogate.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory
