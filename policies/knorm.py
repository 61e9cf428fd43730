"""KNorm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression").

Keys with a *low* L2 norm attract more attention, so the score is ``-||k||_2`` of each (post-RoPE) key:
higher norm = less useful. It is used as a log-space score directly (it is only ever ranked or compared with
a threshold). Default selection: ``ratio=0.5`` (prefill); give a threshold to prune while decoding too.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from kvpolicy.config import PolicyConfig
from kvpolicy.policy import EvictionPolicy, LayerInputs


class KNormConfig(PolicyConfig):
    default_selection: ClassVar[dict[str, Any]] = {"ratio": 0.5}


class KNormPolicy(EvictionPolicy[KNormConfig]):
    config_class = KNormConfig
    supports_decoding = True

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)
