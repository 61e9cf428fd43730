"""Sliding window: keep the most recent ``window`` tokens (and the first ``sinks``), prune everything else.

Every score is ``-inf``, so with the default ``threshold=0`` each token is pruned when it leaves the window;
``window`` and ``sinks`` are the ordinary selection fields of :class:`~kvpolicy.config.PolicyConfig`.
"""

from __future__ import annotations

import torch

from kvpolicy.config import PolicyConfig
from kvpolicy.policy import EvictionPolicy, LayerInputs


class WindowConfig(PolicyConfig):
    pass


class WindowPolicy(EvictionPolicy[WindowConfig]):
    config_class = WindowConfig
    supports_decoding = True

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        batch, heads, tokens, _ = inputs.keys.shape
        return torch.full((batch, heads, tokens), -torch.inf, dtype=torch.float32, device=inputs.keys.device)
