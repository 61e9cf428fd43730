"""A complete third-party policy: a config class and a ``score``.

Score = ``log ||v||_2``: an entry whose value vector is small writes little into the output, whatever
attention it gets. Install this package, set ``KVPOLICY_PLUGINS=value_norm`` and use
``kvpolicy.get_policy("value_norm", ratio=0.5)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from kvpolicy import EvictionPolicy, LayerInputs, PolicyConfig


class ValueNormConfig(PolicyConfig):
    default_selection: ClassVar[dict[str, Any]] = {"ratio": 0.5}


class ValueNormPolicy(EvictionPolicy[ValueNormConfig]):
    config_class = ValueNormConfig
    supports_decoding = True  # a token's score depends on its own value only

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        # Floor so that an all-zero value scores about -69 rather than -inf.
        return inputs.values.float().norm(dim=-1).clamp_min(1e-30).log()
