"""SnapKV (Li et al., 2024): keys that the last few queries of the prompt attend to are the ones to keep.

For the ``w = min(obs_window, T)`` last queries of the forward (the observation window):

1. ``a[q, t, i]``: softmax attention of observation query ``t`` (query head ``q``) over the ``T`` keys of this
   forward (causal; scaled by ``1/sqrt(D)``);
2. averaged over the ``w`` observation queries -> ``(B, Hq, T)``;
3. pooled along the tokens with a 1D ``pooling`` (max or avg) of odd ``kernel_size``, stride 1, same length,
   so neighbours of an important token are kept with it;
4. max over the query heads of each GQA group -> ``(B, H, T)``;
5. ``log`` of that, floored at ``1e-30`` (so a key nobody attends to gets about -69, not -inf).

Prefill only (``supports_decoding = False``). It sees only the queries and keys of the *current* forward's
:class:`LayerInputs`: in a chunked prefill each chunk is scored over its own keys. Default selection:
``ratio=0.5``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from kvpolicy.config import PolicyConfig
from kvpolicy.policy import QUERIES, EvictionPolicy, LayerInputs

SCORE_FLOOR = 1e-30


class SnapKVConfig(PolicyConfig):
    default_selection: ClassVar[dict[str, Any]] = {"ratio": 0.5}

    obs_window: int = Field(default=32, ge=1)
    kernel_size: int = Field(default=5, ge=1)
    pooling: Literal["max", "avg"] = "max"

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"kernel_size must be odd so pooling keeps the sequence length, got {value}")
        return value


class SnapKVPolicy(EvictionPolicy[SnapKVConfig]):
    config_class = SnapKVConfig
    captures = frozenset({QUERIES})
    supports_decoding = False

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        queries, keys = inputs.queries, inputs.keys
        if queries is None:
            raise ValueError("snapkv needs queries; the adapter did not capture them")
        batch, q_heads, tokens, dim = queries.shape
        heads = keys.shape[1]
        if keys.shape[2] != tokens or q_heads % heads:
            raise ValueError(f"snapkv: queries {tuple(queries.shape)} do not match keys {tuple(keys.shape)}")
        group = q_heads // heads
        w = min(self.config.obs_window, tokens)
        obs = queries[:, :, tokens - w:].float()  # (B, Hq, w, D)
        k = keys.float().repeat_interleave(group, dim=1)  # (B, Hq, T, D)
        logits = obs @ k.transpose(-1, -2) / math.sqrt(dim)  # (B, Hq, w, T)
        query_pos = torch.arange(tokens - w, tokens, device=keys.device)
        future = torch.arange(tokens, device=keys.device)[None, :] > query_pos[:, None]
        attn = torch.softmax(logits.masked_fill(future, -torch.inf), dim=-1).mean(dim=2)  # (B, Hq, T)
        ks = self.config.kernel_size
        flat = attn.reshape(batch * q_heads, 1, tokens)
        if self.config.pooling == "max":
            pooled = torch.nn.functional.max_pool1d(flat, ks, stride=1, padding=ks // 2)
        else:
            pooled = torch.nn.functional.avg_pool1d(flat, ks, stride=1, padding=ks // 2, count_include_pad=False)
        pooled = pooled.reshape(batch, heads, group, tokens).amax(dim=2)
        return pooled.clamp_min(SCORE_FLOOR).log()
