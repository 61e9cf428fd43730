"""kvpolicy: pluggable KV-cache eviction policies that really free memory.

Importing this package is cheap: it does not import transformers or SGLang. Adapters load lazily.
"""

from __future__ import annotations

from kvpolicy.config import PolicyConfig, SelectionMode, SelectionScope
from kvpolicy.policy import EvictionPolicy, LayerInputs, ModelInfo, OraclePolicy
from kvpolicy.registry import (
    UnknownPolicyError,
    available_policies,
    get_policy,
    get_policy_class,
    register_policy,
    reload_plugins,
)
from kvpolicy.selection import CompressionReport, Selector, select

__version__ = "0.1.0"


def apply(model, policy, **config):
    """Attach ``policy`` (a name or an :class:`EvictionPolicy`) to a HF transformers model.

    Use as a context manager: ``with kvpolicy.apply(model, "kvzap_mlp", threshold=-4) as session:``
    then ``model.generate(...)``; ``session.report()`` gives the achieved compression.
    """
    from kvpolicy.adapters.hf import apply as _apply

    return _apply(model, policy, **config)


__all__ = [
    "CompressionReport",
    "EvictionPolicy",
    "LayerInputs",
    "ModelInfo",
    "OraclePolicy",
    "PolicyConfig",
    "SelectionMode",
    "SelectionScope",
    "Selector",
    "UnknownPolicyError",
    "apply",
    "available_policies",
    "get_policy",
    "get_policy_class",
    "register_policy",
    "reload_plugins",
    "select",
]
