"""Compaction and ragged-attention ops with a backend dispatcher.

``backend="auto"`` uses the Triton kernels on CUDA tensors when Triton is importable and the torch
reference otherwise; ``"torch"`` and ``"triton"`` force one (``"triton"`` on CPU tensors requires
``TRITON_INTERPRET=1``). Every op validates its inputs and raises ValueError before launching anything.
"""

from __future__ import annotations

from kvpolicy.kernels.dispatch import (
    Backend,
    append,
    append_rows,
    append_spare,
    attention_lse,
    causal_attention_lse,
    compact_heads,
    decode_attention,
    max_attention,
    prefix_segments,
    regrow,
    resolve_backend,
    varlen_attention,
    write_rows,
)
from kvpolicy.kernels.reference import merge_attention

__all__ = [
    "Backend",
    "append",
    "append_rows",
    "append_spare",
    "attention_lse",
    "causal_attention_lse",
    "compact_heads",
    "decode_attention",
    "max_attention",
    "merge_attention",
    "prefix_segments",
    "regrow",
    "resolve_backend",
    "varlen_attention",
    "write_rows",
]
