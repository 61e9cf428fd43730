"""Live controller: what the scheduler hooks in ``_internals`` call after each forward pass.

Per request: record the tokens the forward computed (:meth:`KVPolicyRadixCache.track`), get the policy's
scores for them, stream the scores through a :class:`RequestScorer`, and prune the tokens that left the
window. Returns by how much each request's physical row shrank, so that the hook can make the batch's
``seq_lens`` physical again.

Where the scores come from:

- policies that read only keys/values (``captures`` empty): scored after the forward from the KV pool
  (keys after RoPE, as stored);
- policies that need the attention-layer input (``captures == {"hidden_states"}``, e.g. KVzap): scored
  *during* the forward, by a hook on each layer's attention (:func:`_internals.install_hidden_state_hooks`),
  and kept per request as pending scores until the end of the forward. A token's score depends only on its
  own hidden state (and its prefix), so scoring at capture time equals scoring later, and no hidden state
  is kept beyond its layer.

A chunked prefill is judged after its last chunk, earlier chunks included (pending scores wait; the tree
holds those tokens by then and pruning tombstones them when this request is their only holder).

Policies that need queries are refused: SGLang forms queries inside the attention module and does not
expose them. Tokens of a reused cached prefix are not scored (kept).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kvpolicy.adapters.sglang.config import AdapterConfigError, SGLangPolicyConfig
from kvpolicy.adapters.sglang.scoring import RequestScorer
from kvpolicy.policy import HIDDEN_STATES, EvictionPolicy, LayerInputs

SUPPORTED_CAPTURES = frozenset({HIDDEN_STATES})

log = logging.getLogger(__name__)


def check_live_captures(policy: EvictionPolicy, name: str) -> None:
    """Raise :class:`AdapterConfigError` when the policy captures something live mode cannot provide."""
    unsupported = set(policy.captures) - SUPPORTED_CAPTURES
    if unsupported:
        raise AdapterConfigError(
            f"policy {name!r} needs {', '.join(sorted(unsupported))}, which the SGLang adapter cannot capture: "
            "SGLang computes queries inside its attention module and does not expose them. Use a policy that "
            "scores from keys/values or hidden states (e.g. kvzap_mlp, kvzap_linear, knorm, window)"
        )


@dataclass
class _PendingScores:
    """Scores computed during forwards for one request, not yet pushed to its scorer.

    ``start``: logical position of the first pending token; ``layers[i]``: list of ``(H, t)`` chunks.
    """

    start: int
    length: int = 0
    layers: dict[int, list[torch.Tensor]] = field(default_factory=dict)


class LiveController:
    def __init__(self, cache, policy: EvictionPolicy, config: SGLangPolicyConfig, kv_pool, num_layers: int):
        check_live_captures(policy, config.policy)
        self.cache = cache
        self.policy = policy
        self.config = config
        self.kv_pool = kv_pool
        self.num_layers = num_layers
        self.scorers: dict[str, RequestScorer] = {}
        self.pending: dict[str, _PendingScores] = {}
        self.first_computed: dict[str, int] = {}  # rid -> first position its chunked prefill computed
        self.freed_slots = 0
        self.hook_handles: list = []

    @property
    def captures_hidden_states(self) -> bool:
        return HIDDEN_STATES in self.policy.captures

    def attach(self, model) -> None:
        """Install the hidden-state hooks on ``model`` (SGLang's model object in the scheduler process)."""
        if not self.captures_hidden_states or self.hook_handles:
            return
        from kvpolicy.adapters.sglang._internals import install_hidden_state_hooks

        self.hook_handles = install_hidden_state_hooks(model, self.on_layer)

    def position_offset(self, req) -> int:
        layout = self.cache.layout(req)
        return 0 if layout is None else layout.pruned_count

    def forget(self, rid: str, layout=None, *, retracted: bool = False) -> None:
        """Drop a finished (or retracted) request's state; logs what was pruned (INFO) when its ``layout`` is
        given. A retracted request is prefilled again later as a new one (its layout is gone, offset 0)."""
        scorer = self.scorers.pop(rid, None)
        self.pending.pop(rid, None)
        self.first_computed.pop(rid, None)
        if layout is not None and scorer is not None:
            log.info("kvpolicy: request %s %s: %d of %d tokens pruned; policy %s; %d KV slots freed by "
                     "this worker so far", rid, "retracted" if retracted else "finished", layout.pruned_count,
                     layout.logical_len, scorer.report(), self.freed_slots)

    # -- during the forward (hidden-state policies) -------------------------------------------------------
    def on_layer(self, layer_id: int, hidden_states: torch.Tensor, positions: torch.Tensor, forward_batch) -> None:
        """Score one layer's new tokens of every request in the batch from their hidden states.

        ``hidden_states`` ``(N, hidden)`` (after the input norm), ``positions`` ``(N,)`` logical RoPE positions;
        the layer's new keys/values are in the pool at ``forward_batch.out_cache_loc`` ``(N,)``.
        """
        from kvpolicy.adapters.sglang._internals import batch_rows

        rows = batch_rows(forward_batch)
        if rows is None:
            return
        total = sum(n for _, n in rows)
        if hidden_states.shape[0] != total or positions.shape[0] != total:
            raise RuntimeError(f"kvpolicy: layer {layer_id} saw {hidden_states.shape[0]} hidden-state rows for "
                               f"{total} new tokens of the batch (padding is not supported)")
        keys = self.kv_pool.get_key_buffer(layer_id)
        values = self.kv_pool.get_value_buffer(layer_id)
        loc = forward_batch.out_cache_loc
        offset = 0
        for rid, n in rows:
            span = slice(offset, offset + n)
            offset += n
            if n == 0:
                continue
            pos = positions[span].to(torch.int64).cpu()
            slots = loc[span]
            inputs = LayerInputs(layer_id, keys[slots].permute(1, 0, 2)[None], values[slots].permute(1, 0, 2)[None],
                                 pos, hidden_states=hidden_states[span][None])
            scores = self.policy.score(inputs)[0].float().cpu()  # (H, n)
            pending = self.pending.get(rid)
            if pending is None:
                pending = self.pending[rid] = _PendingScores(start=int(pos[0]))
            chunks = pending.layers.setdefault(layer_id, [])
            if layer_id == 0:
                if int(pos[0]) != pending.start + pending.length:
                    raise RuntimeError(f"kvpolicy: request {rid}: captured positions jump from "
                                       f"{pending.start + pending.length} to {int(pos[0])}")
                pending.length += n
            chunks.append(scores)

    def _take_pending(self, rid: str, start: int, end: int) -> list[torch.Tensor]:
        """Per layer ``(H, end - start)`` pending scores of logical positions ``[start, end)``; drops them."""
        pending = self.pending.pop(rid, None)
        if pending is None or pending.start > start or pending.start + pending.length < end:
            have = "none" if pending is None else f"[{pending.start}, {pending.start + pending.length})"
            raise RuntimeError(f"kvpolicy: request {rid}: no hidden-state scores for positions [{start}, {end}) "
                               f"(captured: {have}); was the forward run without the capture hooks "
                               "(CUDA graph replay)?")
        out = []
        for layer in range(self.num_layers):
            scores = torch.cat(pending.layers[layer], dim=1)
            if scores.shape[1] != pending.length:
                raise RuntimeError(f"kvpolicy: request {rid}: layer {layer} captured {scores.shape[1]} tokens, "
                                   f"layer 0 captured {pending.length}")
            out.append(scores[:, start - pending.start:end - pending.start])
        return out

    # -- after the forward ------------------------------------------------------------------------------
    def after_forward(self, reqs, *, is_prefill: bool) -> list[int]:
        """Track, score and prune after a forward over ``reqs``; returns each row's physical shrink."""
        items, rows = [], []
        for req in reqs:
            logical = len(req.get_fill_ids()) if is_prefill else len(req.origin_input_ids) + len(req.output_ids)
            if is_prefill and logical < len(req.origin_input_ids):
                # An earlier chunk of a chunked prefill: its tokens are judged with the last chunk (the tree
                # holds them by then; prune_batch tombstones them). Remember where this request's own
                # computation started, before cache_unfinished_req moves cache_protected_len.
                self.first_computed.setdefault(req.rid, req.kv.cache_protected_len)
                rows.append(None)
                continue
            previous = self.cache.layout(req)
            if not is_prefill and previous is not None and logical != previous.logical_len + 1:
                raise RuntimeError(f"request {req.rid}: decode went from {previous.logical_len} to {logical} tokens")
            layout = self.cache.track(req, logical)
            scorer = self.scorers.get(req.rid)
            if scorer is None:
                # Tokens of a reused cached prefix were not computed by this request: never pushed, kept.
                first = self.first_computed.pop(req.rid, req.kv.cache_protected_len) if is_prefill else logical - 1
                scorer = self.scorers[req.rid] = RequestScorer(
                    self.policy.config, self.num_layers, vote=self.config.token_vote,
                    min_keep_fraction=self.config.min_keep_fraction, first_position=first)
            start = scorer.next_position
            new_slots = layout.slots[start:logical]
            if new_slots.numel() == 0 or bool((new_slots == 0).any()):
                self.pending.pop(req.rid, None)
                rows.append(None)
                continue
            if self.captures_hidden_states:
                per_layer = self._take_pending(req.rid, start, logical)
            else:
                positions = torch.arange(start, logical, dtype=torch.int64)
                per_layer = []
                for layer in range(self.num_layers):
                    keys = self.kv_pool.get_key_buffer(layer)[new_slots]  # (T, H, D)
                    values = self.kv_pool.get_value_buffer(layer)[new_slots]
                    inputs = LayerInputs(layer, keys.permute(1, 0, 2)[None], values.permute(1, 0, 2)[None], positions)
                    per_layer.append(self.policy.score(inputs)[0].float())
            decision = None
            for layer, scores in enumerate(per_layer):
                if torch.isnan(scores).any():
                    raise RuntimeError(f"policy {self.config.policy!r} returned NaN scores (layer {layer})")
                decision = scorer.push(layer, scores.cpu())
            rows.append(layout.physical_len)
            items.append((req, decision.positions, decision.keep))
        if items:
            self.freed_slots += self.cache.prune_batch(items).freed
        shrink = []
        for req, before in zip(reqs, rows):
            shrink.append(0 if before is None else before - self.cache.layout(req).physical_len)
        return shrink
