"""Attach an eviction policy to a HF transformers model.

How it plugs in, using transformers' own extension points only:

- an attention function registered under the name ``"kvpolicy"`` (``AttentionInterface``) that attends over
  a :class:`PolicyCache` layer (ragged store + pending window) and, right after attention, scores the new
  tokens and applies the selector's decisions ("prune after the layer's attention");
- a forward pre-hook on the model that replaces an empty/missing cache with a :class:`PolicyCache` and passes
  a per-forward :class:`ForwardContext` down to the attention function as a keyword argument (transformers
  forwards extra keyword arguments to the attention interface), so no state is stored on model modules;
- forward pre-hooks on each ``self_attn`` that capture the attention-layer input (after the input norm)
  when the policy needs hidden states.

Everything is undone when the session is detached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicCache  # noqa: I001 (after the version check in _compat)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from kvpolicy.adapters.hf._compat import cache_kwarg, check_versions, crop_to, pop_cache
from kvpolicy.adapters.hf.cache import Layout, PolicyCache, PolicyLayer
from kvpolicy.adapters.hf.capture import decoder_layers, hook_attention_inputs
from kvpolicy.kernels import causal_attention_lse
from kvpolicy.policy import (
    HIDDEN_STATES,
    QUERIES,
    AttentionObservation,
    EvictionPolicy,
    LayerInputs,
    ModelInfo,
    OraclePolicy,
    OracleRunner,
)
from kvpolicy.registry import get_policy
from kvpolicy.selection import CompressionReport, Selector

ATTENTION_NAME = "kvpolicy"
SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3"})
_CONTEXT_KWARG = "kvpolicy_context"


@dataclass
class ForwardContext:
    """Per-forward state handed to the attention function through keyword arguments."""

    session: PolicySession
    cache: PolicyCache | None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    # Oracle passes: attention over a plain DynamicCache, observed per layer (None = just run).
    oracle: bool = False
    observe: Callable[[int, AttentionObservation], None] | None = None
    # The new tokens' padding and positions: the same for every layer, so worked out once, at the first layer.
    tokens: NewTokens | None = None


class NewTokens(NamedTuple):
    """What every layer of one forward needs to know about its ``L`` new tokens."""

    padding: torch.Tensor | None  # (B, L) bool, False for padding; None when none of them is padding
    valid: torch.Tensor  # (B, L) bool (all True when ``padding`` is None)
    positions: torch.Tensor  # (B, L) int64, counted over each sequence's non-padding tokens
    cache_positions: torch.Tensor  # (L,) int64, counted over every token (what LayerInputs.positions holds)


def _kvpolicy_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    ctx: ForwardContext | None = kwargs.get(_CONTEXT_KWARG)
    if ctx is None:
        raise RuntimeError(
            "the model's attention implementation is 'kvpolicy' but no kvpolicy session is attached to this "
            "forward; use `with kvpolicy.apply(model, ...)` or call the model it was attached to"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if ctx.oracle:
        return ctx.session._oracle_attention(ctx, module.layer_idx, query, key, value, scale), None
    return ctx.session._policy_attention(ctx, module.layer_idx, query, key, value, attention_mask, scale), None


def _register_attention() -> None:
    # Idempotent: registering the same function under the same name again is a no-op in effect.
    AttentionInterface.register(ATTENTION_NAME, _kvpolicy_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def model_info(model) -> ModelInfo:
    """Read the facts a policy needs from a HF config; raise ValueError for unsupported models."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", "unknown")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model type {model_type!r}: kvpolicy's HF adapter supports {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"unsupported model: layer types {sorted(set(layer_types))} (only full attention layers)")
    return ModelInfo.from_hf_config(cfg)


def _new_token_validity(attention_mask: torch.Tensor | None, batch: int, new: int, device) -> torch.Tensor:
    """``(B, L)``: False for padding among the new tokens, read off the 4D mask's last query row."""
    if attention_mask is None:
        return torch.ones((batch, new), dtype=torch.bool, device=device)
    row = attention_mask[:, 0, -1, attention_mask.shape[-1] - new:]
    if row.dtype != torch.bool:  # additive float mask
        row = row == 0
    return row.expand(batch, new).clone()


def _new_tokens(cache: PolicyCache, layer: PolicyLayer, attention_mask: torch.Tensor | None, query) -> NewTokens:
    """Padding and positions of a forward's new tokens (``layer`` has already appended them)."""
    batch, _, new, _ = query.shape
    start = layer.seen - new
    cache_positions = torch.arange(start, layer.seen, device=query.device)
    if attention_mask is None:  # the usual unpadded decode step: nothing to read
        positions = cache.next_positions(None, start, batch, new, query.device, cache_positions)
        return NewTokens(None, cache.all_valid(batch, new, query.device), positions, cache_positions)
    valid = _new_token_validity(attention_mask, batch, new, query.device)
    # One read-back per forward, not per layer.
    padding = None if bool(valid.all()) else valid
    positions = cache.next_positions(padding, start, batch, new, query.device, cache_positions)
    return NewTokens(padding, valid, positions, cache_positions)


class PolicySession:
    """A policy attached to one model. Use :func:`apply` for the context-manager form.

    Lower-level use::

        session = PolicySession(model, policy).attach()
        cache = session.new_cache()
        model(input_ids, past_key_values=cache)   # prefill: pruning after each layer's attention
        session.report(cache)                     # achieved compression
        session.detach()
    """

    def __init__(self, model, policy: EvictionPolicy, *, tokenizer=None, layout: Layout | str = Layout.RAGGED,
                 backend: str = "auto") -> None:
        check_versions()  # again here: the import-time check ran before a library may have been swapped
        if not isinstance(policy, EvictionPolicy):
            raise TypeError(f"policy must be an EvictionPolicy, got {type(policy).__name__}")
        self.model = model
        self.policy = policy
        self.tokenizer = tokenizer
        self.layout = Layout(layout)
        self.backend = backend
        self.info = model_info(model)
        self.layers = decoder_layers(model)
        self._cache_kwarg = cache_kwarg(model)
        policy.bind(self.info)
        self.last_cache: PolicyCache | None = None
        self._hooks: list = []
        self._previous_attn: str | None = None
        self._in_oracle = False

    # -- lifecycle --------------------------------------------------------------------------------------
    def attach(self) -> PolicySession:
        if self._hooks:
            raise RuntimeError("session is already attached")
        _register_attention()
        self._previous_attn = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTENTION_NAME)
        self._hooks.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        if HIDDEN_STATES in self.policy.captures or isinstance(self.policy, OraclePolicy):
            self._hooks.extend(hook_attention_inputs(self.model, self._capture_hidden))
        return self

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._previous_attn is not None:
            self.model.set_attn_implementation(self._previous_attn)
            self._previous_attn = None

    def __enter__(self) -> PolicySession:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def new_cache(self) -> PolicyCache:
        selector = Selector(self.policy.config, num_layers=self.info.num_layers)
        return PolicyCache(self.info.num_layers, selector, self.layout, self.backend)

    # -- results ----------------------------------------------------------------------------------------
    def report(self, cache: PolicyCache | None = None) -> CompressionReport:
        """Achieved compression of ``cache`` (default: the cache of the most recent forward)."""
        cache = cache or self.last_cache
        if cache is None:
            raise RuntimeError("no forward has run under this session yet")
        return cache.selector.report()

    def kv_bytes(self, cache: PolicyCache | None = None) -> int:
        cache = cache or self.last_cache
        return 0 if cache is None else cache.kv_bytes()

    def full_kv_bytes(self, cache: PolicyCache | None = None) -> int:
        """Bytes a full (unpruned) dense cache would hold for the same tokens."""
        cache = cache or self.last_cache
        if cache is None or not cache.layers[0].is_initialized:
            return 0
        layer0: PolicyLayer = cache.layers[0]
        batch, heads, _, dim = layer0.pending_keys.shape
        elt = layer0.pending_keys.element_size()
        return 2 * self.info.num_layers * batch * heads * layer0.seen * dim * elt

    # -- hooks ------------------------------------------------------------------------------------------
    @staticmethod
    def _capture_hidden(layer_idx: int, hidden: torch.Tensor, kwargs: dict) -> None:
        ctx: ForwardContext | None = kwargs.get(_CONTEXT_KWARG)
        if ctx is not None:
            ctx.hidden[layer_idx] = hidden

    def _pre_forward(self, module, args, kwargs):
        if self._in_oracle:
            return None  # the oracle runner passes its own context
        cache = pop_cache(kwargs)
        if not isinstance(cache, PolicyCache):
            if isinstance(cache, Cache) and cache.get_seq_length() > 0:
                raise ValueError(
                    "a non-empty cache not created by kvpolicy was passed; start from an empty cache "
                    "(or session.new_cache()) so every entry goes through the policy"
                )
            cache = self.new_cache()
            kwargs["use_cache"] = True
        kwargs[self._cache_kwarg] = cache
        if isinstance(self.policy, OraclePolicy) and cache.get_seq_length() == 0:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                raise ValueError(f"{type(self.policy).__name__} needs input_ids to score the context")
            if kwargs.get("attention_mask") is not None and not bool(kwargs["attention_mask"].all()):
                raise ValueError(f"{type(self.policy).__name__} does not support padded batches")
            self.policy.prepare(self.oracle_runner(), input_ids)
        self.last_cache = cache
        kwargs[_CONTEXT_KWARG] = ForwardContext(self, cache)
        return args, kwargs

    # -- attention --------------------------------------------------------------------------------------
    def _policy_attention(self, ctx: ForwardContext, layer_idx: int, query, key, value, attention_mask, scale):
        layer: PolicyLayer = ctx.cache.layers[layer_idx]
        tokens = ctx.tokens
        if tokens is None:
            tokens = ctx.tokens = _new_tokens(ctx.cache, layer, attention_mask, query)
        if tokens.padding is not None:
            layer.record_padding(tokens.padding)
        out = layer.attend(query, scale)
        self._judge(ctx, layer_idx, layer, query, key, value, tokens)
        return out

    def _judge(self, ctx, layer_idx, layer: PolicyLayer, query, key, value, tokens: NewTokens) -> None:
        selector: Selector = ctx.cache.selector
        first_pass = layer_idx not in ctx.cache.scored_layers
        scores = None
        if first_pass or self.policy.supports_decoding:
            inputs = LayerInputs(
                layer_idx=layer_idx,
                keys=key,
                values=value,
                positions=tokens.cache_positions,
                hidden_states=ctx.hidden.get(layer_idx) if HIDDEN_STATES in self.policy.captures else None,
                queries=query if QUERIES in self.policy.captures else None,
            )
            scores = self.policy.score(inputs)
            if scores.shape != key.shape[:3]:
                raise ValueError(f"{type(self.policy).__name__}.score returned shape {tuple(scores.shape)}, "
                                 f"expected (batch, kv_heads, tokens) = {tuple(key.shape[:3])}")
            ctx.cache.scored_layers.add(layer_idx)
        decisions = selector.push(layer_idx, scores, tokens.positions, tokens.valid, num_heads=key.shape[1],
                                  all_valid=tokens.padding is None)
        for decision in decisions:
            ctx.cache.layers[decision.layer_idx].apply(decision)

    # -- oracle passes ----------------------------------------------------------------------------------
    def _oracle_attention(self, ctx: ForwardContext, layer_idx: int, query, key, value, scale):
        # The queries are the last `new` of the `total` cached positions (context, then the pass so far).
        new, total = query.shape[2], key.shape[2]
        if ctx.observe is None and new == total:  # the context prefill, nothing observed: plain causal SDPA
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                                                   enable_gqa=True)
            return out.transpose(1, 2).contiguous()
        # Output and per-query log-sum-exp in one fused pass (no (new, total) matrix): the lse is pass 1 of a
        # policy's chunked attention statistics, handed over for free.
        out, lse = causal_attention_lse(query, key, value, scale, backend=self.backend)
        if ctx.observe is not None:
            ctx.observe(layer_idx, AttentionObservation(queries=query, keys=key, values=value,
                                                        hidden_states=ctx.hidden[layer_idx], scale=scale, lse=lse))
        return out.transpose(1, 2).to(query.dtype).contiguous()

    def oracle_runner(self) -> OracleRunner:
        """Runner for :class:`OraclePolicy` passes: full-cache forwards that hand each layer's post-RoPE queries,
        keys, values, input hidden states and per-query log-sum-exp to ``observe`` (no attention weights)."""
        state: dict[str, DynamicCache] = {}

        def run(input_ids: torch.Tensor, observe) -> None:
            ctx = ForwardContext(self, None, oracle=True, observe=observe)
            self._in_oracle = True
            try:
                with torch.no_grad():
                    self.model(input_ids=input_ids, use_cache=True,
                               **{self._cache_kwarg: state["cache"], _CONTEXT_KWARG: ctx})
            finally:
                self._in_oracle = False

        def prefill(context_ids: torch.Tensor) -> None:
            state["cache"] = DynamicCache(config=self.model.config)
            run(context_ids, None)

        def out_proj(layer_idx: int) -> torch.Tensor:
            return self.layers[layer_idx].self_attn.o_proj.weight

        encode = None
        if self.tokenizer is not None:
            def encode(text: str) -> list[int]:
                return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        return OracleRunner(
            info=self.info,
            prefill=prefill,
            forward=run,
            crop=lambda n: crop_to(state["cache"], n),
            out_proj=out_proj,
            encode=encode,
        )


def apply(model, policy: str | EvictionPolicy, *, tokenizer=None, layout: Layout | str = Layout.RAGGED,
          backend: str = "auto", **config) -> PolicySession:
    """Attach ``policy`` to ``model``; use as ``with apply(model, "kvzap_mlp", threshold=-4) as session:``.

    ``policy`` is a registry name (configured by ``**config``) or a ready :class:`EvictionPolicy`.
    ``tokenizer`` is needed by oracle policies that encode a text prompt. ``layout="masked"`` keeps the full
    cache and masks pruned entries (reference semantics, frees nothing).
    """
    if isinstance(policy, str):
        policy = get_policy(policy, **config)
    elif config:
        raise TypeError(f"config keywords {sorted(config)} given with a policy instance; configure the instance")
    return PolicySession(model, policy, tokenizer=tokenizer, layout=layout, backend=backend)
