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
from kvpolicy.token_queue import TokenQueue


class Decision(NamedTuple):
    """Keep decisions for the ``count`` oldest pending tokens of one layer.

    ``keep``: ``(B, H, count)`` bool. Padding entries are False. ``keeps_all``: True when the selector knows on the
    host, without reading a tensor, that it pruned none of these entries: ``keep`` is False for padding only, so
    where the consumer knows that none of the tokens is padding, ``keep`` is all True and need not be read.
    """

    layer_idx: int
    count: int
    keep: torch.Tensor
    keeps_all: bool = False


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


class _Runs:
    """Run-length flags, one per pending token, on the host (whether a policy scored the token)."""

    __slots__ = ("runs",)

    def __init__(self) -> None:
        self.runs: list[list] = []  # [count, flag], oldest first

    def append(self, count: int, flag: bool) -> None:
        if count == 0:
            return
        if self.runs and self.runs[-1][1] == flag:
            self.runs[-1][0] += count
        else:
            self.runs.append([count, flag])

    def head(self, count: int) -> list[tuple[int, bool]]:
        """The runs covering the ``count`` oldest tokens (not removed)."""
        out, left = [], count
        for n, flag in self.runs:
            if left == 0:
                break
            out.append((min(n, left), flag))
            left -= out[-1][0]
        return out

    def pop(self, count: int) -> None:
        while count:
            run = self.runs[0]
            if run[0] > count:
                run[0] -= count
                return
            count -= run[0]
            self.runs.pop(0)

    def set_all(self, flag: bool) -> None:
        total = sum(n for n, _ in self.runs)
        self.runs = [[total, flag]] if total else []


class _LayerState:
    """The pending (not yet judged) tokens of one layer, in :class:`TokenQueue` rings so that a decoding push
    copies no window, plus the layer's counts."""

    def __init__(self, batch: int, heads: int, device: torch.device, with_scores: bool, with_positions: bool) -> None:
        self.batch, self.heads, self.device = batch, heads, device
        self.length = 0  # pending tokens
        # (B, H, P) float32; None when nothing reads them (threshold -inf keeps every scored token)
        self.scores = TokenQueue(axis=2) if with_scores else None
        self.scored = _Runs()  # False for tokens nobody scored (kept when they leave)
        self.positions = TokenQueue(axis=1) if with_positions else None  # (B, P) int64; only read for sinks
        self.valid: TokenQueue | None = None  # (B, P) bool; None while no pending token is padding
        self.pushed = 0  # tokens pushed so far
        self.padding_until = 0  # `pushed` after the last push that had padding
        self.pushes = 0
        self.entries = 0
        self.pruned_host = 0
        # Pruned entries = pruned_host - kept: decoding adds its judged entries on the host and keeps its keep-masks
        # on the device, summed every _COUNT_EVERY steps into kept_dev, so that no step reads anything back.
        self.kept_dev: torch.Tensor | None = None
        self.uncounted: list[torch.Tensor] = []
        self._all_kept: torch.Tensor | None = None  # (B, H, 1) True, shared by single-token decisions

    def __len__(self) -> int:
        return self.length

    def all_kept(self, count: int) -> torch.Tensor:
        """``(B, H, count)`` True (one shared tensor for the per-step ``count == 1``: do not modify it)."""
        if count != 1:
            return torch.ones((self.batch, self.heads, count), dtype=torch.bool, device=self.device)
        if self._all_kept is None:
            self._all_kept = torch.ones((self.batch, self.heads, 1), dtype=torch.bool, device=self.device)
        return self._all_kept

    @property
    def pruned(self) -> int:
        self.count_kept()
        return self.pruned_host - (0 if self.kept_dev is None else int(self.kept_dev))

    def count_kept(self) -> None:
        """Fold the keep-masks not counted yet into ``kept_dev`` (one stack and sum, no read-back)."""
        if self.uncounted:
            kept = torch.stack(self.uncounted).sum()
            self.kept_dev = kept if self.kept_dev is None else self.kept_dev.add_(kept)
            self.uncounted = []

    def score_view(self) -> torch.Tensor:
        return self.scores.view()

    def valid_view(self) -> torch.Tensor:
        if self.valid is not None:
            return self.valid.view()
        return torch.ones((self.batch, len(self)), dtype=torch.bool, device=self.device)

    def positions_view(self) -> torch.Tensor:
        return self.positions.view()


# A decoding push on an accelerator checks its scores for NaN on the device; the flags are read back this often.
_NAN_CHECK_EVERY = 64
# Up to this many scores in CPU memory are checked on the host.
_HOST_CHECK_MAX = 64
# Keep-masks of decoding steps whose kept entries are summed together (one sum per this many steps, not per step).
_COUNT_EVERY = 32


def _reads_back_cheaply(t: torch.Tensor) -> bool:
    """Whether reading ``t`` on the host is cheap (CPU memory: no stream to wait for)."""
    return t.is_cpu


def _has_nan(nested: list) -> bool:
    """Whether a ``(B, H, T)`` nested list (``tolist()``) holds a NaN."""
    for row in nested:
        for head in row:
            for x in head:
                if x != x:
                    return True
    return False


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
    _nan_flag: torch.Tensor | None = None  # decoding NaN checks not read back yet (accelerators)
    _nan_unchecked: int = 0

    def push(
        self,
        layer_idx: int,
        scores: torch.Tensor | None,
        positions: torch.Tensor,
        valid: torch.Tensor,
        num_heads: int | None = None,
        all_valid: bool | None = None,
    ) -> list[Decision]:
        """Append ``T`` new tokens of one layer.

        ``scores``: ``(B, H, T)`` log scores, or None when the policy cannot score these tokens (kept).
        ``positions``: ``(B, T)`` absolute positions; ``valid``: ``(B, T)`` False for padding.
        ``num_heads`` is required when ``scores`` is None. ``all_valid``: whether ``valid`` is all True, if the
        caller knows (saves reading it back); None: read it.

        NaN scores raise ValueError. For single-token pushes (decoding) on an accelerator the check runs on the
        device and is read back every 64 pushes and by :meth:`report`, so the error may surface a few steps late.
        """
        if scores is not None:
            if scores.dim() != 3:
                raise ValueError(f"scores must be (batch, kv_heads, tokens), got shape {tuple(scores.shape)}")
            self._reject_nan(layer_idx, scores)
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
        ranked = self.config.threshold is None  # the mode is THRESHOLD exactly when a threshold is set
        state = self._layers.get(layer_idx)
        first_push = state is None
        if state is None:
            state = self._layers[layer_idx] = _LayerState(batch, heads, device, with_scores=self._reads_scores(),
                                                          with_positions=self.config.sinks > 0)
        elif (state.batch, state.heads) != (batch, heads):
            raise ValueError(
                f"layer {layer_idx}: batch/heads changed from {(state.batch, state.heads)} to {(batch, heads)}"
            )
        if all_valid is None:
            all_valid = bool(valid.all())
        if state.scores is not None:
            if scores is None:  # a placeholder: unscored tokens are kept whatever it says
                state.scores.append(torch.full((batch, heads, tokens), math.inf, dtype=torch.float32, device=device))
            else:
                state.scores.append(scores if scores.dtype == torch.float32 else scores.float())
        state.length += tokens
        # Ratio/budget rank only the prefill; a threshold applies to every token a policy scored.
        state.scored.append(tokens, scores is not None and (first_push or not ranked))
        if state.positions is not None:
            state.positions.append(positions)
        if not all_valid and state.valid is None:
            state.valid = TokenQueue(axis=1)
            state.valid.append(torch.ones((batch, len(state) - tokens), dtype=torch.bool, device=device))
        if state.valid is not None:
            state.valid.append(valid)
        state.pushed += tokens
        if not all_valid:
            state.padding_until = state.pushed
        state.pushes += 1
        state.entries += (batch * tokens if all_valid else int(valid.sum())) * heads

        if ranked and first_push and self.config.scope is SelectionScope.MODEL:
            self._deferred.append(layer_idx)
            if len(self._deferred) < self.num_layers:
                return []
            layers, self._deferred = self._deferred, []
            return self._rank([self._layers[i] for i in layers], layers)
        if ranked and first_push:
            return self._rank([state], [layer_idx])
        return [self._judge_threshold(layer_idx, state)]

    def _reads_scores(self) -> bool:
        """Whether decisions ever read the scores (not in threshold mode with ``threshold=-inf``)."""
        return self.config.mode is not SelectionMode.THRESHOLD or self.config.threshold != -math.inf

    def _reject_nan(self, layer_idx: int, scores: torch.Tensor) -> None:
        if scores.numel() <= _HOST_CHECK_MAX and _reads_back_cheaply(scores):
            # A decoding step's few scores in CPU memory: reading them is cheaper than two tensor ops.
            if _has_nan(scores.tolist()):
                raise ValueError(f"policy returned NaN scores for layer {layer_idx}")
            return
        if scores.shape[2] > 1 or _reads_back_cheaply(scores):
            if bool(torch.isnan(scores).any()):
                raise ValueError(f"policy returned NaN scores for layer {layer_idx}")
            return
        flag = torch.isnan(scores).any()
        self._nan_flag = flag if self._nan_flag is None else self._nan_flag | flag
        self._nan_unchecked += 1
        if self._nan_unchecked >= _NAN_CHECK_EVERY:
            self._check_deferred_nan()

    def _check_deferred_nan(self) -> None:
        flag, unchecked = self._nan_flag, self._nan_unchecked
        self._nan_flag, self._nan_unchecked = None, 0
        if flag is not None and bool(flag):
            raise ValueError(f"policy returned NaN scores while decoding (in one of the last {unchecked} "
                             "single-token pushes)")

    def _leaving(self, state: _LayerState) -> int:
        return max(0, len(state) - self.config.window)

    def _pop(self, layer_idx: int, state: _LayerState, count: int, keep: torch.Tensor | None) -> Decision:
        """Remove the ``count`` oldest pending tokens with their keep-mask (None: every real one kept)."""
        keeps_all = keep is None
        if state.valid is None:  # no padding among them
            if keep is None:
                keep = state.all_kept(count)
            else:
                state.pruned_host += state.batch * state.heads * count
                if count == 1:  # decoding: one sum every _COUNT_EVERY steps
                    state.uncounted.append(keep)
                    if len(state.uncounted) >= _COUNT_EVERY:
                        state.count_kept()
                else:
                    kept = keep.sum()
                    state.kept_dev = kept if state.kept_dev is None else state.kept_dev.add_(kept)
        else:
            valid = state.valid.front(count)[:, None, :]
            if keep is None:
                keep = valid.expand(state.batch, state.heads, count).clone()
            else:
                keep = keep & valid
                state.pruned_host += int((valid & ~keep).sum())
        if state.scores is not None:
            state.scores.pop(count)
        state.length -= count
        state.scored.pop(count)
        if state.positions is not None:
            state.positions.pop(count)
        if state.valid is not None:
            state.valid.pop(count)
            if state.pushed - len(state) >= state.padding_until:  # no pending token is padding any more
                state.valid = None
        return Decision(layer_idx, count, keep, keeps_all)

    def _judge_threshold(self, layer_idx: int, state: _LayerState) -> Decision:
        count = self._leaving(state)
        threshold = self.config.threshold
        # Kept outright: no threshold (ranked modes after their prefill), -inf, or nobody scored these tokens.
        if threshold is None or threshold == -math.inf:
            return self._pop(layer_idx, state, count, None)
        runs = state.scored.head(count)
        if not any(flag for _, flag in runs):
            return self._pop(layer_idx, state, count, None)
        keep = threshold_keep(state.scores.front(count), float(threshold))
        if not all(flag for _, flag in runs):
            unscored = torch.cat([torch.full((n,), not flag, dtype=torch.bool) for n, flag in runs])
            keep |= unscored.to(keep.device)[None, None, :]
        if self.config.sinks > 0:
            keep |= (state.positions.front(count) < self.config.sinks)[:, None, :]
        return self._pop(layer_idx, state, count, keep)

    def _rank(self, states: list[_LayerState], layer_ids: list[int]) -> list[Decision]:
        cfg = self.config
        batch, heads = states[0].batch, states[0].heads
        counts = [self._leaving(s) for s in states]
        device = states[0].device
        decisions_keep = [torch.zeros((batch, heads, c), dtype=torch.bool, device=device) for c in counts]
        # Units ranked together: (layer, head) for head scope, layer for layer scope, all for model scope.
        if cfg.scope is SelectionScope.HEAD:
            groups = [[(li, h)] for li in range(len(states)) for h in range(heads)]
        elif cfg.scope is SelectionScope.LAYER:
            groups = [[(li, h) for h in range(heads)] for li in range(len(states))]
        else:
            groups = [[(li, h) for li in range(len(states)) for h in range(heads)]]
        views = [(s.score_view(), s.valid_view(), s.positions_view() if cfg.sinks > 0 else None) for s in states]
        for group in groups:
            score_rows, cand_rows, protected = [], [], torch.zeros(batch, dtype=torch.long)
            total = torch.zeros(batch, dtype=torch.long)
            for li, h in group:
                (scores, real, positions), c = views[li], counts[li]
                sink = real & (positions < cfg.sinks) if positions is not None else torch.zeros_like(real)
                leaving_sink = sink[:, :c]
                protected += (real[:, c:].sum(1) + leaving_sink.sum(1)).cpu()
                total += real.sum(1).cpu()
                score_rows.append(scores[:, h, :c])
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
        for s, (_, _, positions), li_id, c, keep in zip(states, views, layer_ids, counts, decisions_keep):
            if positions is not None:
                keep |= (positions[:, :c] < cfg.sinks)[:, None, :]
            # Tokens still in the window are protected; once they leave they are kept (already decided).
            s.scored.set_all(False)
            out.append(self._pop(li_id, s, c, keep))
        return out

    def report(self) -> CompressionReport:
        self._check_deferred_nan()
        return CompressionReport(
            tuple(LayerStats(i, s.entries, s.pruned) for i, s in sorted(self._layers.items()))
        )

    def pending(self, layer_idx: int) -> int:
        """Number of tokens of ``layer_idx`` not judged yet."""
        state = self._layers.get(layer_idx)
        return 0 if state is None else len(state)


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
