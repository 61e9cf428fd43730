"""From per-(layer, kv_head) keep decisions to one keep decision per token (pure torch, no SGLang)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpolicy.adapters.sglang.config import TokenVote
from kvpolicy.selection import Decision


def vote_tokens(
    decisions: Sequence[Decision],
    vote: TokenVote = TokenVote.ANY,
    min_keep_fraction: float = 0.5,
) -> torch.Tensor:
    """Combine the decisions of every layer for the same ``count`` tokens into ``(B, count)`` bool.

    ``decisions``: one :class:`~kvpolicy.selection.Decision` per layer, each ``keep`` ``(B, H, count)``; all
    must cover the same tokens (same ``count``), which is what threshold selection produces when every layer
    has pushed the same tokens. With ``vote=ANY`` a token is kept if any (layer, head) keeps it; with
    ``vote=FRACTION`` if the kept fraction of its ``layers * H`` entries is ``>= min_keep_fraction``.
    """
    if not decisions:
        raise ValueError("vote_tokens needs the decisions of at least one layer")
    counts = {d.count for d in decisions}
    if len(counts) != 1:
        raise ValueError(f"layers decided different numbers of tokens: {sorted(counts)}")
    stacked = torch.cat([d.keep for d in decisions], dim=1)  # (B, layers * H, count)
    if vote is TokenVote.ANY:
        return stacked.any(dim=1)
    if not 0.0 < min_keep_fraction <= 1.0:
        raise ValueError(f"min_keep_fraction must be in (0, 1], got {min_keep_fraction}")
    return stacked.float().mean(dim=1) >= min_keep_fraction
