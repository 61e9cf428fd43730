"""KVzap-MLP: ``Linear(hidden -> hidden_dim) -> GELU -> Linear(hidden_dim -> kv_heads)`` per layer predicts log
KVzip+ scores (arXiv 2601.07891).

Config: ``surrogate`` (required, local checkpoint directory in NVIDIA's layout); default ``threshold=-4.0``.
"""

from __future__ import annotations

from kvpolicy.policies._kvzap import KVzapConfig, KVzapPolicy


class KVzapMLPConfig(KVzapConfig):
    pass


class KVzapMLPPolicy(KVzapPolicy):
    """Accepts only MLP checkpoints (``hidden_dim`` set); see :class:`KVzapPolicy` for the score."""

    config_class = KVzapMLPConfig
    surrogate_kind = "mlp"
