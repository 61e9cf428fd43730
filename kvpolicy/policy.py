"""The eviction-policy contract.

A policy *scores* the cache entries of one layer; it never decides. Turning scores into a keep-mask
(threshold, ratio, budget, protected window, sinks) is done once, by :mod:`kvpolicy.selection`.

Two kinds of policy:

- :class:`EvictionPolicy` scores from what the adapter captured during the normal forward pass
  (hidden states, keys, values, queries). If ``supports_decoding`` is true, its score for a token depends
  only on that token and its prefix, so adapters can score each decoded token when it is generated.
- :class:`OraclePolicy` needs extra forward passes over the context (KVzip's repeat prompt). Its
  lifecycle is explicit: ``prepare(runner, context_ids)`` once per context, then ``score()`` per layer
  during the prefill of exactly that context.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch

from kvpolicy.config import PolicyConfig

# Names of the optional inputs a policy can ask an adapter to capture (see LayerInputs).
HIDDEN_STATES = "hidden_states"
QUERIES = "queries"


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the model a policy is attached to."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "unknown"

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.num_attention_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelInfo:
        """Read the facts from a Hugging Face config: a ``PretrainedConfig`` or a ``config.json`` dict (the text
        config of a multimodal model is used). ValueError names a missing or malformed field."""
        if not isinstance(config, Mapping):
            config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
        config = config.get("text_config") or config
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or hidden // heads)
            layers = int(config["num_hidden_layers"])
        except KeyError as exc:
            raise ValueError(f"the model config lacks the field {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the model config has a malformed field: {exc}") from exc
        return cls(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_kv_heads=kv_heads,
                   head_dim=head_dim, model_type=str(config.get("model_type", "unknown")))


@dataclass(frozen=True)
class LayerInputs:
    """What an adapter captured for one layer during one forward pass.

    Shapes (B = batch, T = new tokens in this forward, H = kv heads, Hq = query heads, D = head dim):

    - ``keys``, ``values``: ``(B, H, T, D)``, keys after RoPE, exactly as they are stored in the cache.
    - ``hidden_states``: ``(B, T, hidden)``, the attention-layer input *after* the input norm, or None when
      the policy did not ask for it.
    - ``queries``: ``(B, Hq, T, D)`` after RoPE, or None when the policy did not ask for it.
    - ``positions``: ``(T,)`` absolute positions of the new tokens (int64).
    - ``layer_idx``: index of the decoder layer.
    """

    layer_idx: int
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    hidden_states: torch.Tensor | None = None
    queries: torch.Tensor | None = None


ConfigT = TypeVar("ConfigT", bound=PolicyConfig)


class EvictionPolicy(abc.ABC, Generic[ConfigT]):
    """Scores KV-cache entries of one layer; higher means more worth keeping.

    Subclasses set:

    - ``config_class``: a frozen pydantic :class:`PolicyConfig` subclass with the policy's own fields.
    - ``captures``: which optional inputs the adapter must capture (``"hidden_states"``, ``"queries"``).
    - ``supports_decoding``: whether ``score`` may be called on decoded tokens one step at a time.
      True only when a token's score depends on that token (and its prefix) alone.

    Contract of :meth:`score`: returns a float32 tensor ``(B, H, T)`` of *log-space* scores for the T new
    tokens in ``inputs``; ``-inf`` is allowed ("prune unless protected"); NaN is not and adapters raise on it.
    Scoring must not modify its inputs.
    """

    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig
    captures: ClassVar[frozenset[str]] = frozenset()
    supports_decoding: ClassVar[bool] = False
    name: ClassVar[str] = ""

    def __init__(self, config: ConfigT) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} expects {self.config_class.__name__}, got {type(config).__name__}")
        self.config: ConfigT = config

    @classmethod
    def from_kwargs(cls, **kwargs) -> EvictionPolicy:
        """Build the policy from plain keyword arguments, validated by ``config_class``."""
        return cls(cls.config_class(**kwargs))

    def bind(self, model: ModelInfo) -> None:
        """Called once by an adapter before the first forward. Raise ValueError if the model is unsupported
        (e.g. a surrogate whose dimensions do not match). The default accepts any model."""

    @abc.abstractmethod
    def score(self, inputs: LayerInputs) -> torch.Tensor:
        """Return ``(B, H, T)`` float32 log-space scores for the new tokens of one layer."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


@dataclass(frozen=True)
class OracleRunner:
    """What an adapter lends an :class:`OraclePolicy` to run its extra passes.

    ``forward(input_ids, observe)``: runs the model on ``input_ids`` ``(B, T)`` continuing after the
    already-prefilled ``prefix`` state held by the runner, calling ``observe(layer_idx, attn)`` per layer with
    :class:`AttentionObservation`. ``prefill(context_ids)`` resets the runner state to just the context.
    ``crop(n)`` drops everything after the first ``n`` tokens. ``out_proj(layer_idx)`` is the output
    projection weight ``(hidden, Hq * D)``. ``info`` describes the model. ``encode(text)`` tokenizes text
    without special tokens, or is None when the adapter was given no tokenizer.
    """

    info: ModelInfo
    prefill: Callable[[torch.Tensor], None]
    forward: Callable[[torch.Tensor, Callable[[int, "AttentionObservation"], None]], None]
    crop: Callable[[int], None]
    out_proj: Callable[[int], torch.Tensor]
    encode: Callable[[str], list[int]] | None = None


@dataclass(frozen=True)
class AttentionObservation:
    """One layer's attention inputs during an oracle pass (no attention matrix: a policy that needs
    attention statistics computes them in chunks, see :mod:`kvpolicy.kernels`).

    Shapes (B = batch, L = new queries, S = all keys: the cache before the pass plus the L new tokens):

    - ``queries``: ``(B, Hq, L, D)`` after RoPE; query ``t`` sits at position ``S - L + t`` and attends
      causally (keys ``0 .. S - L + t``), scaled by ``scale``.
    - ``keys``, ``values``: ``(B, H, S, D)``, keys after RoPE.
    - ``hidden_states``: ``(B, L, hidden)`` attention-layer input (after the input norm) of the queries.
    - ``scale``: the softmax scale of the logits ``q . k``.
    - ``lse``: ``(B, Hq, L)`` float32 log-sum-exp of each query's scaled causal logits (keys
      ``0 .. S - L + t``) when the runner had it from its own attention; None otherwise.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    hidden_states: torch.Tensor
    scale: float
    lse: torch.Tensor | None = None


class OraclePolicy(EvictionPolicy[ConfigT]):
    """A policy that scores a context with extra forward passes before its prefill.

    Lifecycle: ``prepare(runner, context_ids)`` computes and stores per-layer scores for that context;
    ``score(inputs)`` then returns the stored scores for the prefill of exactly that context and raises
    RuntimeError otherwise (wrong length, not prepared). Oracles cannot score decoded tokens.
    """

    supports_decoding: ClassVar[bool] = False

    def __init__(self, config: ConfigT) -> None:
        super().__init__(config)
        self._scores: dict[int, torch.Tensor] = {}
        self._context_len: int | None = None

    @abc.abstractmethod
    def compute_scores(self, runner: OracleRunner, context_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Return ``{layer_idx: (B, H, T) float32 log scores}`` for the T context tokens."""

    def prepare(self, runner: OracleRunner, context_ids: torch.Tensor) -> None:
        self._scores = self.compute_scores(runner, context_ids)
        self._context_len = int(context_ids.shape[-1])

    def reset(self) -> None:
        self._scores, self._context_len = {}, None

    @property
    def prepared(self) -> bool:
        return self._context_len is not None

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        if self._context_len is None:
            raise RuntimeError(f"{type(self).__name__} scores a context with extra passes: call prepare() first")
        n_new = inputs.keys.shape[2]
        if n_new != self._context_len or int(inputs.positions[0]) != 0:
            raise RuntimeError(
                f"{type(self).__name__} was prepared for a {self._context_len}-token context but is asked to "
                f"score {n_new} tokens at position {int(inputs.positions[0])}; oracles only score the prefill "
                "of the context they prepared"
            )
        return self._scores[inputs.layer_idx]
