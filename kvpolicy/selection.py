"""From scores to keep decisions, once for every policy and adapter.

Rules (``PolicyConfig`` holds the settings):

- The most recent ``window`` tokens are never pruned. A token is *judged once*, when it leaves the window.
- The first ``sinks`` tokens (absolute positions ``< sinks``) are never pruned.
- Threshold mode: a judged entry is pruned when ``score < threshold`` (strict). ``threshold=-inf`` prunes
  nothing; ``threshold=+inf`` prunes everything that is not protected.
- Ratio / budget modes rank the entries of the first forward pass (the prefill) of each layer: per sequence,
  ``floor(N * (1 - ratio))`` or ``budget`` entries are kept per scope unit (head, layer, or model), protected
  entries first, then the highest scores. Tokens that arrive later (decoding) are kept.
- Tokens a policy could not score (decoded tokens of a prefill-only policy) are kept.
- Padding (``valid == False``) is never kept and never counted.

:class:`Selector` implements this as a stream: adapters push each layer's new scores and get back
decisions for the tokens that left the window. :class:`CompressionReport` counts what was pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from kvpolicy.config import PolicyConfig, SelectionMode, SelectionScope


class Decision(NamedTuple):
    """Keep decisions for the ``count`` oldest pending tokens of one layer.

    ``keep``: ``(B, H, count)`` bool. Padding entries are False.
    """

    layer_idx: int
    count: int
    keep: torch.Tensor


class LayerStats(NamedTuple):
    layer_idx: int
    entries: int  # real (non-padding) entries seen, all heads
    pruned: int  # of which pruned

    @property
    def compression(self) -> float:
        """Pruned entries / all entries (0 = nothing pruned)."""
        return self.pruned / self.entries if self.entries else 0.0


class CompressionReport(NamedTuple):
    layers: tuple[LayerStats, ...]

    @property
    def entries(self) -> int:
        return sum(s.entries for s in self.layers)

    @property
    def pruned(self) -> int:
        return sum(s.pruned for s in self.layers)

    @property
    def compression(self) -> float:
        """Achieved compression ratio: pruned entries / all entries, over all layers and heads."""
        return self.pruned / self.entries if self.entries else 0.0

    @property
    def kept_fraction(self) -> float:
        return 1.0 - self.compression

    def __str__(self) -> str:
        per_layer = ", ".join(f"L{s.layer_idx}={s.compression:.3f}" for s in self.layers)
        return f"compression {self.compression:.3f} ({self.pruned}/{self.entries} pruned; {per_layer})"


def threshold_keep(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep-mask of threshold selection (protection not applied): ``score >= threshold``; +inf keeps none."""
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    if threshold == math.inf:
        return torch.zeros_like(scores, dtype=torch.bool)
    return scores >= threshold


def top_entries(scores: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per row, mark the ``count[row]`` highest-scored candidates.

    ``scores``/``candidates``: ``(R, N)``; ``count``: ``(R,)`` int. Ties are broken by lower index first.
    Returns a ``(R, N)`` bool mask, a subset of ``candidates``.
    """
    rows, n = scores.shape
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)
    cand_sorted = torch.gather(candidates, 1, by_score)
    # Stable re-sort so that candidates come first, still in descending score order.
    by_cand = torch.argsort((~cand_sorted).to(torch.int8), dim=1, stable=True)
    order = torch.gather(by_score, 1, by_cand)
    rank = torch.arange(n, device=scores.device).expand(rows, n)
    limit = torch.minimum(count.to(torch.long), candidates.sum(dim=1))
    chosen_sorted = rank < limit[:, None]
    chosen = torch.zeros_like(candidates)
    chosen.scatter_(1, order, chosen_sorted)
    return chosen & candidates


@dataclass
class _LayerState:
    scores: torch.Tensor  # (B, H, P) float32
    scored: torch.Tensor  # (P,) bool: False for tokens nobody scored (kept when they leave)
    positions: torch.Tensor  # (B, P) int64
    valid: torch.Tensor  # (B, P) bool
    pushes: int = 0
    entries: int = 0
    pruned: int = 0


@dataclass
class Selector:
    """Streaming selection for all layers of one model and one batch of sequences.

    ``push(layer_idx, scores, positions, valid)`` appends a layer's new tokens and returns the decisions
    that became final. In threshold mode and head/layer scope they come back at once for that layer; with
    ``scope="model"`` the decisions of the prefill come back when the last layer has pushed.
    """

    config: PolicyConfig
    num_layers: int
    _layers: dict[int, _LayerState] = field(default_factory=dict)
    _deferred: list[int] = field(default_factory=list)

    def push(
        self,
        layer_idx: int,
        scores: torch.Tensor | None,
        positions: torch.Tensor,
        valid: torch.Tensor,
        num_heads: int | None = None,
    ) -> list[Decision]:
        """Append ``T`` new tokens of one layer.

        ``scores``: ``(B, H, T)`` log scores, or None when the policy cannot score these tokens (kept).
        ``positions``: ``(B, T)`` absolute positions; ``valid``: ``(B, T)`` False for padding.
        ``num_heads`` is required when ``scores`` is None.
        """
        if scores is not None:
            if scores.dim() != 3:
                raise ValueError(f"scores must be (batch, kv_heads, tokens), got shape {tuple(scores.shape)}")
            if torch.isnan(scores).any():
                raise ValueError(f"policy returned NaN scores for layer {layer_idx}")
            batch, heads, tokens = scores.shape
        else:
            if num_heads is None:
                raise ValueError("num_heads is required when scores is None")
            batch, tokens = positions.shape
            heads = num_heads
        if positions.shape != (batch, tokens) or valid.shape != (batch, tokens):
            raise ValueError(
                f"positions {tuple(positions.shape)} and valid {tuple(valid.shape)} must be ({batch}, {tokens})"
            )
        device = positions.device
        new_scores = (
            scores.float()
            if scores is not None
            else torch.full((batch, heads, tokens), math.inf, dtype=torch.float32, device=device)
        )
        ranked = self.config.mode is not SelectionMode.THRESHOLD
        state = self._layers.get(layer_idx)
        first_push = state is None
        # Ratio/budget rank only the prefill; a threshold applies to every token a policy scored.
        new_scored = torch.full((tokens,), scores is not None and (first_push or not ranked), device=device)
        if state is None:
            state = self._layers[layer_idx] = _LayerState(
                scores=new_scores, scored=new_scored, positions=positions.clone(), valid=valid.clone()
            )
        else:
            if state.scores.shape[:2] != (batch, heads):
                raise ValueError(
                    f"layer {layer_idx}: batch/heads changed from {tuple(state.scores.shape[:2])} to {(batch, heads)}"
                )
            state.scores = torch.cat([state.scores, new_scores], dim=2)
            state.scored = torch.cat([state.scored, new_scored])
            state.positions = torch.cat([state.positions, positions], dim=1)
            state.valid = torch.cat([state.valid, valid], dim=1)
        state.pushes += 1
        state.entries += int(valid.sum()) * heads

        if ranked and first_push and self.config.scope is SelectionScope.MODEL:
            self._deferred.append(layer_idx)
            if len(self._deferred) < self.num_layers:
                return []
            layers, self._deferred = self._deferred, []
            return self._rank([self._layers[i] for i in layers], layers)
        if ranked and first_push:
            return self._rank([state], [layer_idx])
        return [self._judge_threshold(layer_idx, state)]

    def _leaving(self, state: _LayerState) -> int:
        return max(0, state.scores.shape[2] - self.config.window)

    def _pop(self, layer_idx: int, state: _LayerState, count: int, keep: torch.Tensor) -> Decision:
        keep = keep & state.valid[:, None, :count]
        state.pruned += int((state.valid[:, None, :count] & ~keep).sum())
        state.scores = state.scores[:, :, count:]
        state.scored = state.scored[count:]
        state.positions = state.positions[:, count:]
        state.valid = state.valid[:, count:]
        return Decision(layer_idx, count, keep)

    def _judge_threshold(self, layer_idx: int, state: _LayerState) -> Decision:
        count = self._leaving(state)
        scores = state.scores[:, :, :count]
        keep = threshold_keep(scores, float(self.config.threshold)) if self.config.threshold is not None else (
            torch.ones_like(scores, dtype=torch.bool)
        )
        keep |= ~state.scored[:count][None, None, :]
        keep |= (state.positions[:, :count] < self.config.sinks)[:, None, :]
        return self._pop(layer_idx, state, count, keep)

    def _rank(self, states: list[_LayerState], layer_ids: list[int]) -> list[Decision]:
        cfg = self.config
        batch, heads, _ = states[0].scores.shape
        counts = [self._leaving(s) for s in states]
        decisions_keep = [torch.zeros((batch, heads, c), dtype=torch.bool, device=s.scores.device)
                          for s, c in zip(states, counts)]
        # Units ranked together: (layer, head) for head scope, layer for layer scope, all for model scope.
        if cfg.scope is SelectionScope.HEAD:
            groups = [[(li, h)] for li in range(len(states)) for h in range(heads)]
        elif cfg.scope is SelectionScope.LAYER:
            groups = [[(li, h) for h in range(heads)] for li in range(len(states))]
        else:
            groups = [[(li, h) for li in range(len(states)) for h in range(heads)]]
        for group in groups:
            score_rows, cand_rows, protected = [], [], torch.zeros(batch, dtype=torch.long)
            total = torch.zeros(batch, dtype=torch.long)
            for li, h in group:
                s, c = states[li], counts[li]
                real = s.valid
                sink = real & (s.positions < cfg.sinks)
                leaving_sink = sink[:, :c]
                protected += (real[:, c:].sum(1) + leaving_sink.sum(1)).cpu()
                total += real.sum(1).cpu()
                score_rows.append(s.scores[:, h, :c])
                cand_rows.append(real[:, :c] & ~leaving_sink)
            if cfg.ratio is not None:
                quota = torch.floor(total.double() * (1.0 - cfg.ratio)).long()
            else:
                quota = torch.full_like(total, int(cfg.budget))
            free = (quota - protected).clamp(min=0)
            chosen = top_entries(torch.cat(score_rows, 1), torch.cat(cand_rows, 1), free.to(score_rows[0].device))
            offset = 0
            for li, h in group:
                c = counts[li]
                decisions_keep[li][:, h, :] = chosen[:, offset:offset + c]
                offset += c
        out = []
        for s, li_id, c, keep in zip(states, layer_ids, counts, decisions_keep):
            keep |= (s.positions[:, :c] < cfg.sinks)[:, None, :]
            # Tokens still in the window are protected; once they leave they are kept (already decided).
            s.scored = torch.zeros_like(s.scored)
            out.append(self._pop(li_id, s, c, keep))
        return out

    def report(self) -> CompressionReport:
        return CompressionReport(
            tuple(LayerStats(i, s.entries, s.pruned) for i, s in sorted(self._layers.items()))
        )

    def pending(self, layer_idx: int) -> int:
        """Number of tokens of ``layer_idx`` not judged yet."""
        state = self._layers.get(layer_idx)
        return 0 if state is None else state.scores.shape[2]


def select(
    scores: torch.Tensor,
    config: PolicyConfig,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-shot selection for a whole sequence of one layer: ``(B, H, T)`` scores → ``(B, H, T)`` keep-mask.

    Equivalent to pushing all tokens through a :class:`Selector` in one go; tokens left in the window
    are kept. Positions are ``0..T-1`` (counted over valid tokens per row).
    """
    batch, heads, tokens = scores.shape
    if valid is None:
        valid = torch.ones((batch, tokens), dtype=torch.bool, device=scores.device)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    sel = Selector(config if config.scope is not SelectionScope.MODEL else config.model_copy(
        update={"scope": SelectionScope.LAYER}), num_layers=1)
    (decision,) = sel.push(0, scores, positions, valid)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[:, :, : decision.count] = decision.keep
    return keep & valid[:, None, :]
