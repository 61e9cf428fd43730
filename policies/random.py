"""Random eviction: a baseline every other policy must beat.

Score = ``log U`` with ``U ~ Uniform(0, 1)``, so under a threshold ``t`` each judged entry is pruned with
probability ``exp(t)``; the default ``threshold = -ln 2`` prunes half. Draws are reproducible: each call uses
its own generator seeded from (``seed``, layer, position of the first new token), so the same forward
gives the same scores in any process. (Prefill and token-by-token decoding of the same text draw
differently: each call is one draw.)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from kvpolicy.config import PolicyConfig
from kvpolicy.policy import EvictionPolicy, LayerInputs

_MIX = 1_000_003  # odd multiplier mixing (seed, layer, position) into one generator seed


class RandomConfig(PolicyConfig):
    default_selection: ClassVar[dict[str, Any]] = {"threshold": -math.log(2.0)}

    seed: int = 0


class RandomPolicy(EvictionPolicy[RandomConfig]):
    config_class = RandomConfig
    supports_decoding = True

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        batch, heads, tokens, _ = inputs.keys.shape
        first = int(inputs.positions[0]) if inputs.positions.numel() else 0
        seed = ((self.config.seed * _MIX + inputs.layer_idx) * _MIX + first) % (2**63)
        gen = torch.Generator().manual_seed(seed)
        uniform = torch.rand((batch, heads, tokens), generator=gen, dtype=torch.float32)
        # rand() is in [0, 1): log(0) = -inf is allowed by the contract ("prune unless protected").
        return uniform.log().to(inputs.keys.device)
