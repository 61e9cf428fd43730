"""Per-request eviction inside a running SGLang scheduler, on the head-row pool.

During every forward, a hook on each layer's attention module (:func:`install_hidden_state_hooks`)
runs after that layer's attention wrote its new keys and values. For each request of the batch it scores the
layer's new tokens (from their hidden states for KVzap, or from the stored keys/values), pushes the scores into
the request's :class:`~kvpolicy.selection.Selector` (threshold, protected window, sinks: the same rules as the HF
adapter), and frees the head-rows of the entries the selector dropped for tokens that left the window. So
pruning happens after the layer's attention, and later forwards see only the kept entries.

What a request may free (everything else is kept):

- only tokens it computed itself: the tokens of a cached prefix it reused were judged by the request that
  computed them;
- a token the radix tree holds only when the tree node is locked by this request alone: a prefix another
  running request reads is never changed under it;
- only entries still present (a prefix may point at a copy another request already pruned).

With ``granularity="token"`` the decisions of all layers for the same tokens are combined by the token vote
and a voted-out token loses every entry.

Each request runs with the policy :meth:`RowController.choice_for` decides: the server's ``--kv-policy``, or the one
it named in ``custom_params`` within the server's ``--kv-policy-allow`` (:mod:`kvpolicy.adapters.sglang.requests`);
``none`` scores nothing. When it finishes, its report (policy, rows freed, compression per KV head) waits in
:attr:`RowController.reports` for its last output (``meta_info["kvpolicy"]``).

A policy that returns NaN (or fails otherwise) fails only that request: its scoring stops, it keeps its entries,
and the scheduler finishes it with an error (:meth:`RowController.take_failures`).

Under tensor parallelism each rank's controller scores and frees its own KV heads (:class:`KVHeadShard`): a
policy that scores from hidden states (KVzap; the attention input is replicated on every rank) returns every
head and the rank keeps its own; a policy that scores keys/values sees the rank's heads only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from kvpolicy.adapters.sglang.config import AdapterConfigError, Granularity, SGLangPolicyConfig
from kvpolicy.adapters.sglang.ranks import KVHeadShard
from kvpolicy.adapters.sglang.requests import Choice, RequestPolicyError
from kvpolicy.adapters.sglang.token_vote import vote_tokens
from kvpolicy.policy import HIDDEN_STATES, EvictionPolicy, LayerInputs
from kvpolicy.selection import Decision, Selector

SUPPORTED_CAPTURES = frozenset({HIDDEN_STATES})
MAX_REPORTS = 4096  # finished requests' reports kept for their last output
MAX_CHOICES = 65536  # requests whose policy choice is cached

log = logging.getLogger(__name__)


def check_live_captures(policy: EvictionPolicy, name: str) -> None:
    """Raise :class:`AdapterConfigError` when the policy captures something the adapter cannot provide."""
    unsupported = set(policy.captures) - SUPPORTED_CAPTURES
    if unsupported:
        raise AdapterConfigError(
            f"policy {name!r} needs {', '.join(sorted(unsupported))}, which the SGLang adapter cannot capture: "
            "SGLang computes queries inside its attention module and does not expose them. Use a policy that "
            "scores from keys/values or hidden states (e.g. kvzap_mlp, kvzap_linear, knorm, window)"
        )


@dataclass
class _Request:
    """Streaming state of one running request."""

    choice: Choice  # what the request runs with (policy name, resolved config, prefix namespace)
    policy: EvictionPolicy | None  # the policy that scores this request; None: no eviction (``none``)
    selector: Selector | None
    first: int  # the first position this request computed (a reused prefix ends there)
    next_position: list[int]  # per layer: the next position to push
    next_judged: list[int]  # per layer: the oldest pushed position not decided yet
    token_decisions: dict[int, tuple[int, Decision]] = field(default_factory=dict)  # token mode: layer -> (start, d)
    # Frees decided during a chunked prefill wait for its last chunk, per layer: (start, drop (count, H)).
    deferred: dict[int, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)
    failure: str | None = None
    freed: int = 0
    freed_per_head: torch.Tensor | None = None  # (H,) int64: entries freed per local KV head
    in_prefill: bool = False  # the current forward is a chunk of a prefill with chunks left


class RowController:
    """Scores, selects and frees per request; built once per scheduler process (one per TP rank and DP replica)
    by the radix-cache factory.

    ``policies``: ``{name: policy}``, the server's default (``config.policy``) and every other policy requests may
    choose (``--kv-policy-allow``), each built once; a request's choice comes from :meth:`choice_for`.
    ``shard``: the KV heads this rank holds (default: all of ``kv_cache``'s, one rank); ``replica``: the DP
    replica, for the log lines.
    """

    def __init__(self, policies: dict[str, EvictionPolicy], config: SGLangPolicyConfig, kv_cache, allocator,
                 req_to_token, *, num_layers: int, shard: KVHeadShard | None = None, replica: int = 0) -> None:
        if config.policy not in policies:
            raise AdapterConfigError(f"the server's policy {config.policy!r} was not built")
        for name, built in policies.items():
            check_live_captures(built, name)
        self.policies = dict(policies)
        self.config = config
        self.choices = config.request_policies()
        # rid -> choice, from the prefix match to the request's release; a cache of a deterministic resolution, so
        # bounding it (requests aborted while waiting are never released) only costs a resolution again.
        self._choices: OrderedDict[str, Choice] = OrderedDict()
        self.reports: OrderedDict[str, dict] = OrderedDict()  # rid -> meta_info report of a finished request
        self.kv_cache = kv_cache
        self.allocator = allocator
        self.req_to_token = req_to_token
        self.num_layers = num_layers
        self.num_heads = kv_cache.head_num
        self.shard = shard if shard is not None else KVHeadShard.of(0, 1, self.num_heads)
        if self.shard.local_heads != self.num_heads:
            raise AdapterConfigError(f"the KV pool holds {self.num_heads} heads per layer but TP rank "
                                     f"{self.shard.tp_rank} of {self.shard.tp_size} should hold {self.shard.heads}")
        self.rank_label = f"dp{replica} {self.shard.label()}"
        self.requests: dict[str, _Request] = {}
        self.batch: dict[str, object] = {}  # rid -> Req of the batch being run
        self._failed: dict[str, str] = {}
        self._freed_since = 0  # rows freed since take_freed() was last called
        self.hook_handles: list = []

    # -- lifecycle ----------------------------------------------------------------------------------------
    def attach(self, model) -> None:
        if not self.hook_handles:
            self.hook_handles = install_hidden_state_hooks(model, self.on_layer)

    def begin_batch(self, reqs) -> None:
        self.batch = {req.rid: req for req in reqs}

    def choice_for(self, req) -> Choice:
        """What ``req`` runs with: the policy and config its ``custom_params`` chose within the server's limits, or
        the server's default (the one place a request's policy is decided). Resolved once per request; raises
        :class:`RequestPolicyError` for a choice the server refuses (the HTTP server refused it already, with
        400), or for a request that reached the scheduler without its prefix-cache namespace."""
        choice = self._choices.get(req.rid)
        if choice is None:
            choice = self.choices.resolve(getattr(req.sampling_params, "custom_params", None))
            # The HTTP server's hook appended the namespace (SGLang may append a LoRA id after it).
            if self.choices.per_request and choice.namespace not in (req.extra_key or ""):
                raise RequestPolicyError(f"request {req.rid} reached the scheduler with prefix-cache key "
                                         f"{req.extra_key!r}, not its policy's namespace {choice.namespace!r}")
            self._choices[req.rid] = choice
            while len(self._choices) > MAX_CHOICES:
                self._choices.popitem(last=False)
        return choice

    def match_window(self, req) -> int | None:
        """The window rule's window for matching ``req``'s prefix (:meth:`HeadRowRadixCache.match_prefix`); None
        when the request may reuse no prefix (its choice is refused: it fails at its first forward)."""
        if req is None:  # a match without a request (SGLang internals): the most restrictive window
            return max(self.choices.windows())
        try:
            return self.choice_for(req).window
        except RequestPolicyError:
            return None

    def on_release(self, req) -> None:
        """Drop a finished or retracted request's state; log what it freed (one INFO line per rank, parsed by
        ``kvpolicy bench-serve``): the entries of this rank's KV heads, and the replica, rank and heads they are.
        A finished request's report waits in :attr:`reports` for its last output (meta_info). A retracted request is
        prefilled again later as a new one."""
        state = self.requests.pop(req.rid, None)
        finished = req.finished()
        if finished:
            self._choices.pop(req.rid, None)
        if state is None:
            return
        tokens = state.next_position[0] - state.first
        entries = tokens * self.num_layers * self.num_heads
        how = "finished" if finished else "retracted"
        per_head = state.freed_per_head.tolist() if state.freed_per_head is not None else [0] * self.num_heads
        decided = state.selector.report().compression if state.selector is not None else 0.0
        log.info("kvpolicy: request %s %s: %d of %d entries freed; policy compression %.4f; rank %s; "
                 "freed per head %s; policy %s", req.rid, how, state.freed, entries, decided,
                 self.rank_label, ",".join(map(str, per_head)), state.choice.policy)
        if not finished:
            return
        per_head_entries = tokens * self.num_layers
        self.reports[req.rid] = {
            "policy": state.choice.policy, "config": state.choice.request_fields(),
            "namespace": state.choice.namespace, "entries": entries, "rows_freed": state.freed,
            "compression": state.freed / entries if entries else 0.0, "policy_compression": decided,
            "kv_heads": list(self.shard.heads),
            "compression_per_head": [f / per_head_entries if per_head_entries else 0.0 for f in per_head],
            "tp_size": self.shard.tp_size,
        }
        while len(self.reports) > MAX_REPORTS:  # reports nobody streamed (e.g. TP ranks that send no output)
            self.reports.popitem(last=False)

    def take_report(self, rid: str) -> dict | None:
        """The meta_info report of a finished request (once), None if there is none."""
        return self.reports.pop(rid, None)

    def take_freed(self) -> int:
        """Rows the policy freed since the last call (the scheduler re-opens admission when this is > 0)."""
        freed, self._freed_since = self._freed_since, 0
        return freed

    def take_failures(self) -> dict[str, str]:
        """Requests whose policy failed since the last call: ``{rid: reason}``."""
        failed, self._failed = self._failed, {}
        return failed

    # -- during the forward -------------------------------------------------------------------------------
    def on_layer(self, layer_id: int, hidden_states: torch.Tensor, positions: torch.Tensor, forward_batch) -> None:
        """Score and select one layer's new tokens for every request of the batch; free what was dropped."""
        rows = batch_rows(forward_batch)
        if rows is None:
            return
        total = sum(n for _, n in rows)
        if hidden_states.shape[0] != total or positions.shape[0] != total:
            raise RuntimeError(f"kvpolicy: layer {layer_id} saw {hidden_states.shape[0]} hidden-state rows for "
                               f"{total} new tokens of the batch (padding is not supported)")
        loc = forward_batch.out_cache_loc
        offset = 0
        for rid, n in rows:
            span = slice(offset, offset + n)
            offset += n
            req = self.batch.get(rid)
            if n == 0 or req is None:
                continue
            pos = positions[span].to("cpu", torch.int64)
            state = self.requests.get(rid)
            if state is None:
                state = self._start(req, int(pos[0]))
            if state.failure is not None:
                continue
            if int(pos[0]) != state.next_position[layer_id]:
                self._fail(rid, state, f"layer {layer_id} positions jump from {state.next_position[layer_id]} to "
                                       f"{int(pos[0])}")
                continue
            state.next_position[layer_id] += n
            if state.policy is None:  # no eviction for this request
                continue
            keys, values, _ = self.kv_cache.gather(layer_id, loc[span])
            inputs = LayerInputs(layer_id, keys.permute(1, 0, 2)[None], values.permute(1, 0, 2)[None], pos,
                                 hidden_states=hidden_states[span][None])
            name = state.choice.policy
            try:
                scores = state.policy.score(inputs).float().cpu()  # (1, H, n): every KV head or this rank's
            except Exception as exc:  # a policy's error fails its request, never the server
                self._fail(rid, state, f"policy {name!r} failed (layer {layer_id}): {exc!r}")
                continue
            if scores.dim() != 3 or scores.shape[0] != 1 or scores.shape[2] != n or \
                    scores.shape[1] not in (self.num_heads, self.shard.total_heads):
                self._fail(rid, state, f"policy {name!r} returned scores of shape {tuple(scores.shape)}, expected "
                                       f"{(1, self.shard.total_heads, n)}")
                continue
            if bool(torch.isnan(scores).any()):
                self._fail(rid, state, f"policy {name!r} returned NaN scores (layer {layer_id})")
                continue
            scores = self.shard.own_scores(scores)
            decisions = state.selector.push(layer_id, scores, pos[None], torch.ones((1, n), dtype=torch.bool))
            # A prefill split into chunks frees nothing before its last chunk, so that every chunk attends to the
            # whole prompt so far, as one unchunked prefill (and the HF adapter) would.
            state.in_prefill = int(pos[-1]) + 1 < len(req.origin_input_ids) + len(req.output_ids)
            for decision in decisions:
                self._decided(req, state, decision)
            if not state.in_prefill:
                for start, drop in state.deferred.pop(layer_id, []):
                    self._free(req, state, layer_id, start, drop)

    def _start(self, req, first: int) -> _Request:
        """The streaming state of a request at its first forward (a refused choice fails it at once)."""
        positions = [first] * self.num_layers
        try:
            choice = self.choice_for(req)
        except RequestPolicyError as exc:
            state = self.requests[req.rid] = _Request(self.choices.default, None, None, first, positions,
                                                      list(positions))
            self._fail(req.rid, state, str(exc))
            return state
        policy = None if choice.config is None else self.policies[choice.policy]
        selector = None if policy is None else Selector(choice.config, num_layers=self.num_layers)
        state = self.requests[req.rid] = _Request(choice, policy, selector, first, positions, list(positions))
        return state

    def _fail(self, rid: str, state: _Request, reason: str) -> None:
        state.failure = reason
        self._failed[rid] = reason
        log.error("kvpolicy: request %s: %s; the request is aborted, its entries are kept", rid, reason)

    def _decided(self, req, state: _Request, decision: Decision) -> None:
        layer = decision.layer_idx
        start = state.next_judged[layer]
        state.next_judged[layer] = start + decision.count
        if decision.count == 0:
            return
        if self.config.granularity is Granularity.HEAD:
            self._free(req, state, layer, start, ~decision.keep[0].t())
            return
        state.token_decisions[layer] = (start, decision)
        if len(state.token_decisions) < self.num_layers:
            return
        starts = {s for s, _ in state.token_decisions.values()}
        decided = [d for _, d in (state.token_decisions[i] for i in range(self.num_layers))]
        state.token_decisions.clear()
        if len(starts) != 1:  # a broken selector fails its request, never the server
            self._fail(req.rid, state, f"layers decided different tokens {sorted(starts)}")
            return
        keep = vote_tokens(decided, self.config.token_vote, self.config.min_keep_fraction)[0]  # (count,)
        drop = (~keep)[:, None].expand(-1, self.num_heads)
        for layer_id in range(self.num_layers):
            self._free(req, state, layer_id, start, drop)

    def _free(self, req, state: _Request, layer: int, start: int, drop: torch.Tensor) -> None:
        """Free ``drop`` ``(count, H)`` of ``layer`` for positions ``start..start+count`` of ``req`` (deferred while
        its chunked prefill has chunks left)."""
        if state.in_prefill:
            state.deferred.setdefault(layer, []).append((start, drop))
            return
        count = drop.shape[0]
        positions = torch.arange(start, start + count)
        slots = self.req_to_token[req.kv.req_pool_idx, start:start + count].to(torch.int64)
        drop = drop & self._may_free(req, positions)[:, None]
        present = self.kv_cache.rows.row_of[layer - self.kv_cache.start_layer, slots.to(self.kv_cache.rows.device)]
        drop = drop & (present != 0).cpu()
        if bool(drop.any()):
            freed = self.allocator.free_entries(layer - self.kv_cache.start_layer, slots, drop)
            state.freed += freed
            per_head = drop.sum(dim=0, dtype=torch.int64)
            state.freed_per_head = per_head if state.freed_per_head is None else state.freed_per_head + per_head
            self._freed_since += freed

    @staticmethod
    def _may_free(req, positions: torch.Tensor) -> torch.Tensor:
        """``(count,)`` bool: positions the request owns, or holds in the tree under its own lock alone."""
        protected = req.kv.cache_protected_len
        allowed = positions >= protected
        if bool(allowed.all()):
            return allowed
        # Walk the request's locked tree path; node (start, end) spans in token positions.
        spans = []
        node = req.last_node
        while node is not None and node.parent is not None:
            spans.append(node)
            node = node.parent
        end = sum(len(n.value) for n in spans)
        if end != protected:
            # Not the path this request holds: free nothing the tree holds rather than guess (and say so).
            log.warning("kvpolicy: request %s: tree path holds %d tokens, protected %d; its tree-held tokens "
                        "are kept", req.rid, end, protected)
            return allowed
        sole = torch.zeros(protected, dtype=torch.bool)
        for n in spans:  # leaf first
            begin = end - len(n.value)
            sole[begin:end] = n.lock_ref == 1
            end = begin
        inside = positions < protected
        allowed[inside] = sole[positions[inside]]
        return allowed


# SGLang does not pass hidden states to RadixAttention. In its decoder layers (Qwen3, Llama, ...) the layer
# communicator applies ``input_layernorm`` before calling ``self_attn(positions=, hidden_states=,
# forward_batch=)``, so what ``self_attn`` receives is the normed attention input KVzap is defined on. A forward
# hook on each attention module (the parent of a ``RadixAttention`` named ``attn``) sees those keyword
# arguments and runs after the layer's keys/values were written to the pool. CUDA graph replay would skip it
# (the launcher refuses graphs on GPU).


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """``{layer_id: self_attn module}``: every module whose ``attn`` child is a ``RadixAttention``."""
    from sglang.srt.layers.radix_attention import RadixAttention

    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        attn = getattr(module, "attn", None)
        if isinstance(attn, RadixAttention):
            if attn.layer_id in found:
                raise RuntimeError(f"two attention modules claim layer {attn.layer_id}")
            found[attn.layer_id] = module
    return found


def install_hidden_state_hooks(model, on_layer) -> list:
    """Register a forward hook on each attention module of ``model``; returns the hook handles.

    ``on_layer(layer_id, hidden_states (N, hidden), positions (N,), forward_batch)`` is called after the
    layer's attention ran; ``N`` is the number of new tokens of the whole batch, request after request
    (``forward_batch.rids`` order).
    """
    modules = attention_modules(model)
    if not modules:
        raise RuntimeError(f"{type(model).__name__}: no attention module with a RadixAttention 'attn' child; "
                           "the kvpolicy capture does not know this model's layout")

    def make_hook(layer_id: int):
        def hook(module, args, kwargs, output):
            if args:
                raise RuntimeError(f"kvpolicy: layer {layer_id}'s attention was called with positional "
                                   "arguments; the capture expects SGLang's keyword call")
            on_layer(layer_id, kwargs["hidden_states"], kwargs["positions"], kwargs["forward_batch"])
        return hook

    return [module.register_forward_hook(make_hook(layer_id), with_kwargs=True)
            for layer_id, module in sorted(modules.items())]


def batch_rows(forward_batch) -> list[tuple[str, int]] | None:
    """``[(rid, new_tokens)]`` in row order for an extend or decode batch; None for other modes (idle...)."""
    mode = forward_batch.forward_mode
    rids = forward_batch.rids
    if rids is None:  # a forward without scheduler requests (e.g. a dummy run): nothing to score
        return None
    if mode.is_decode():
        return [(rid, 1) for rid in rids]
    if mode.is_extend():
        return list(zip(rids, forward_batch.extend_seq_lens_cpu))
    return None
