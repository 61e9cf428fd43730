"""KVzap-Linear: one ``Linear(hidden -> kv_heads)`` per layer predicts log KVzip+ scores (arXiv 2601.07891).

Config: ``surrogate`` (required, local checkpoint directory in NVIDIA's layout); default ``threshold=-4.0``.
"""

from __future__ import annotations

from kvpolicy.policies._kvzap import KVzapConfig, KVzapPolicy


class KVzapLinearConfig(KVzapConfig):
    pass


class KVzapLinearPolicy(KVzapPolicy):
    """Accepts only linear checkpoints (``hidden_dim: null``); see :class:`KVzapPolicy` for the score."""

    config_class = KVzapLinearConfig
    surrogate_kind = "linear"
