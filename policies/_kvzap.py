"""Shared by ``kvzap_linear`` and ``kvzap_mlp``: a surrogate checkpoint scores hidden states.

Not a policy itself (no entry point); the two policies differ only in which checkpoint kind they accept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from kvpolicy.config import PolicyConfig
from kvpolicy.policy import HIDDEN_STATES, EvictionPolicy, LayerInputs, ModelInfo
from kvpolicy.surrogate import KVzapSurrogate, load_surrogate


class KVzapConfig(PolicyConfig):
    """``surrogate``: local directory of a KVzap checkpoint (``config.json`` + ``model.safetensors``).

    Default selection: ``threshold=-4.0`` (log KVzip+ score; the KVzap paper's thresholds are around -3…-6
    for Qwen3-8B and -6…-9 for Llama-3.1-8B: tune it per model and report the achieved compression).
    """

    default_selection: ClassVar[dict[str, Any]] = {"threshold": -4.0}

    surrogate: Path


class KVzapPolicy(EvictionPolicy[KVzapConfig]):
    """Score = ``surrogate.layers[layer](hidden_states)`` ``(B, T, kv_heads)`` -> ``(B, kv_heads, T)`` float32.

    The hidden state is the attention-layer input after the input norm, so a decoded token is scored from
    its own hidden state alone (``supports_decoding``). The checkpoint is loaded when the policy is built;
    :meth:`bind` checks it against the model.
    """

    config_class = KVzapConfig
    captures = frozenset({HIDDEN_STATES})
    supports_decoding = True
    surrogate_kind: ClassVar[Literal["linear", "mlp"]]

    def __init__(self, config: KVzapConfig) -> None:
        super().__init__(config)
        self.surrogate: KVzapSurrogate = load_surrogate(config.surrogate)
        self._check_kind()
        self._on_device: dict[torch.device, KVzapSurrogate] = {}

    @property
    def _policy_name(self) -> str:
        return f"kvzap_{self.surrogate_kind}"

    def _check_kind(self) -> None:
        cfg = self.surrogate.config
        if cfg.kind != self.surrogate_kind:
            other = "kvzap_mlp" if cfg.kind == "mlp" else "kvzap_linear"
            raise ValueError(
                f"{self._policy_name} needs a {self.surrogate_kind} surrogate, but {self.config.surrogate} is a "
                f"{cfg.kind} checkpoint (hidden_dim={cfg.hidden_dim}); use the {other!r} policy for it"
            )

    def bind(self, model: ModelInfo) -> None:
        cfg = self.surrogate.config
        mismatches = [
            f"input_dim={cfg.input_dim} but the model's hidden_size={model.hidden_size}"
            if cfg.input_dim != model.hidden_size else None,
            f"output_dim={cfg.output_dim} but the model's num_kv_heads={model.num_kv_heads}"
            if cfg.output_dim != model.num_kv_heads else None,
            f"n_modules={cfg.n_modules} but the model's num_layers={model.num_layers}"
            if cfg.n_modules != model.num_layers else None,
        ]
        mismatches = [m for m in mismatches if m]
        if mismatches:
            raise ValueError(
                f"{self._policy_name} surrogate {self.config.surrogate} does not fit this {model.model_type} "
                f"model: {'; '.join(mismatches)} (a checkpoint trained for another model?)"
            )

    def _surrogate_on(self, device: torch.device) -> KVzapSurrogate:
        # The loaded copy stays on CPU; each other device gets its own copy once.
        if device.type == "cpu":
            return self.surrogate
        if device not in self._on_device:
            copy = KVzapSurrogate(self.surrogate.config).to(device)
            copy.load_state_dict(self.surrogate.state_dict())
            self._on_device[device] = copy.eval().requires_grad_(False)
        return self._on_device[device]

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        hidden = inputs.hidden_states
        if hidden is None:
            raise ValueError(f"{self._policy_name} needs hidden_states; the adapter did not capture them")
        cfg = self.surrogate.config
        if hidden.dim() != 3 or hidden.shape[-1] != cfg.input_dim:
            raise ValueError(f"{self._policy_name}: hidden_states must be (B, T, {cfg.input_dim}), got "
                             f"{tuple(hidden.shape)}")
        if not 0 <= inputs.layer_idx < cfg.n_modules:
            raise ValueError(f"{self._policy_name}: layer {inputs.layer_idx} out of range for a surrogate with "
                             f"{cfg.n_modules} layers")
        surrogate = self._surrogate_on(hidden.device)
        with torch.no_grad():
            scores = surrogate(inputs.layer_idx, hidden.float())  # (B, T, H)
        return scores.transpose(1, 2).contiguous()
