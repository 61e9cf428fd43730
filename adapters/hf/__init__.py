"""HF transformers adapter: ``apply(model, policy, **config)`` and the lower-level :class:`PolicySession`."""

from kvpolicy.adapters.hf.cache import Layout, PolicyCache, PolicyLayer, dense_attention
from kvpolicy.adapters.hf.session import SUPPORTED_MODEL_TYPES, PolicySession, apply, model_info

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Layout",
    "PolicyCache",
    "PolicyLayer",
    "PolicySession",
    "apply",
    "dense_attention",
    "model_info",
]
