"""Per-request streaming selection: per-layer scores of new tokens -> token keep decisions (no SGLang import).

One :class:`RequestScorer` per running request. Each forward pass, for every layer, the adapter pushes the
``(kv_heads, T)`` log scores the policy gave the request's ``T`` new tokens; the shared
:class:`~kvpolicy.selection.Selector` applies threshold, window and sinks per (layer, head), and once every
layer has decided the same tokens, :func:`~kvpolicy.adapters.sglang.token_vote.vote_tokens` turns them into
one decision per token, ready for :meth:`KVPolicyRadixCache.prune`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvpolicy.adapters.sglang.config import TokenVote
from kvpolicy.adapters.sglang.token_vote import vote_tokens
from kvpolicy.config import PolicyConfig, SelectionMode
from kvpolicy.selection import CompressionReport, Decision, Selector


class TokenDecisions(NamedTuple):
    """``positions`` ``(K,)`` int64 logical positions, ``keep`` ``(K,)`` bool."""

    positions: torch.Tensor
    keep: torch.Tensor


class RequestScorer:
    """Streaming token decisions for one request.

    ``first_position``: logical position of the first token this scorer will see (the length of a cached
    prefix the request reused: those tokens are never pushed, so they are kept). The protected window
    counts pushed tokens, so reused tokens make protection longer, never shorter.
    """

    def __init__(self, config: PolicyConfig, num_layers: int, *, vote: TokenVote = TokenVote.ANY,
                 min_keep_fraction: float = 0.5, first_position: int = 0) -> None:
        if config.mode is not SelectionMode.THRESHOLD:
            raise ValueError("the SGLang adapter streams threshold decisions only")
        self.selector = Selector(config, num_layers)
        self.num_layers = num_layers
        self.vote = vote
        self.min_keep_fraction = min_keep_fraction
        self.next_position = first_position  # logical position of the next token to be pushed
        self._next_judged = first_position  # logical position of the oldest token not decided yet
        self._decided: dict[int, Decision] = {}
        self._pushed_layers: set[int] = set()

    def push(self, layer_idx: int, scores: torch.Tensor) -> TokenDecisions | None:
        """Push layer ``layer_idx``'s ``(kv_heads, T)`` scores for the current forward's new tokens.

        Returns the token decisions when this was the last layer of the forward pass, else None.
        """
        if scores.dim() != 2:
            raise ValueError(f"scores must be (kv_heads, tokens), got {tuple(scores.shape)}")
        if layer_idx in self._pushed_layers:
            raise ValueError(f"layer {layer_idx} pushed twice in one forward pass")
        tokens = scores.shape[1]
        positions = torch.arange(self.next_position, self.next_position + tokens, dtype=torch.int64)[None]
        valid = torch.ones((1, tokens), dtype=torch.bool)
        for decision in self.selector.push(layer_idx, scores[None], positions, valid):
            self._decided[decision.layer_idx] = decision
        self._pushed_layers.add(layer_idx)
        if len(self._pushed_layers) < self.num_layers:
            return None
        self._pushed_layers.clear()
        self.next_position += tokens
        decisions = [self._decided.pop(i) for i in range(self.num_layers)]
        count = decisions[0].count
        keep = vote_tokens(decisions, self.vote, self.min_keep_fraction)[0]
        judged = torch.arange(self._next_judged, self._next_judged + count, dtype=torch.int64)
        self._next_judged += count
        return TokenDecisions(judged, keep)

    def report(self) -> CompressionReport:
        """Per-(layer, head) compression the policy asked for (the freed slots follow the token vote)."""
        return self.selector.report()
