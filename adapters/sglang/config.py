"""User-facing configuration of the SGLang adapter (validated by pydantic; no SGLang import here).

Two things are configured:

- the policy: a registry name plus its own config fields (``--kv-policy NAME --kv-policy-config JSON``);
- how per-(layer, kv_head) decisions become one decision per *token* (:class:`TokenVote`), because an SGLang
  KV slot holds a token's keys and values for every layer and head at once: a slot can only be freed when the
  whole token goes.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvpolicy.config import SelectionMode
from kvpolicy.policy import EvictionPolicy, ModelInfo, OraclePolicy
from kvpolicy.registry import UnknownPolicyError, get_policy_class


class AdapterConfigError(ValueError):
    """An invalid or unsupported ``--kv-policy`` / ``--kv-policy-config`` combination (clear message)."""


class TokenVote(str, enum.Enum):
    """How the per-(layer, kv_head) keep decisions of one token become the token's decision.

    - ``any`` (default): keep the token if *any* layer/head keeps it. Never drops an entry the per-head policy
      wanted, so attention over kept tokens is a superset of what per-head pruning would give; it frees less.
    - ``fraction``: keep the token if at least ``min_keep_fraction`` of its (layer, head) entries are kept
      (``min_keep_fraction=0.5`` is a majority vote). Frees more, may drop entries some heads wanted.
    """

    ANY = "any"
    FRACTION = "fraction"


class SGLangPolicyConfig(BaseModel):
    """What ``--kv-policy`` / ``--kv-policy-config`` and the token vote resolve to."""

    # "constants": +-inf thresholds survive the JSON hand-off to the scheduler as Infinity/-Infinity
    # (pydantic's default writes null, which would silently turn "prune nothing" into the default threshold).
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    policy: str = Field(min_length=1)
    policy_config: dict[str, Any] = Field(default_factory=dict)
    token_vote: TokenVote = TokenVote.ANY
    min_keep_fraction: float = Field(default=0.5, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _fraction_only_with_fraction_vote(self) -> SGLangPolicyConfig:
        if self.token_vote is TokenVote.ANY and "min_keep_fraction" in self.model_fields_set:
            raise ValueError("min_keep_fraction applies to token_vote='fraction' only")
        return self

    def build_policy(self) -> EvictionPolicy:
        """Instantiate and validate the policy for serving; raises :class:`AdapterConfigError` with a clear
        message for unknown names, invalid fields and combinations the SGLang adapter does not support."""
        try:
            policy_class = get_policy_class(self.policy)
        except UnknownPolicyError as exc:
            raise AdapterConfigError(str(exc)) from exc
        except (ImportError, TypeError) as exc:  # a declared policy whose module fails to load
            raise AdapterConfigError(f"policy {self.policy!r} cannot be loaded: {exc}") from exc
        if issubclass(policy_class, OraclePolicy):
            raise AdapterConfigError(
                f"policy {self.policy!r} is an oracle (it needs extra forward passes over each context before "
                "its prefill); oracles are for offline scoring and training, not serving. Use a surrogate such "
                "as kvzap_mlp or kvzap_linear with SGLang"
            )
        try:
            policy = policy_class.from_kwargs(**self.policy_config)
        except (ValueError, TypeError, OSError) as exc:  # pydantic errors, or a policy's own checks (files)
            raise AdapterConfigError(f"invalid --kv-policy-config for {self.policy!r}: {exc}") from exc
        if policy.config.mode is not SelectionMode.THRESHOLD:
            raise AdapterConfigError(
                f"the SGLang adapter supports threshold selection only (got {policy.config.mode.value}): "
                "ratio/budget rank a whole prefill, so a compressed prefix cached for one request would not be "
                "what another request sharing it would have kept"
            )
        policy.name = self.policy  # type: ignore[misc]
        return policy


def parse_policy_flags(
    policy: str | None,
    policy_config_json: str | None,
    *,
    token_vote: str | None = None,
    min_keep_fraction: float | None = None,
) -> SGLangPolicyConfig | None:
    """Turn the raw flag strings into a validated config; None when ``--kv-policy`` was not given."""
    if policy is None:
        if policy_config_json is not None:
            raise AdapterConfigError("--kv-policy-config given without --kv-policy")
        return None
    fields: dict[str, Any] = {"policy": policy}
    if policy_config_json is not None:
        try:
            raw = json.loads(policy_config_json)
        except json.JSONDecodeError as exc:
            raise AdapterConfigError(f"--kv-policy-config is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise AdapterConfigError(f"--kv-policy-config must be a JSON object, got {type(raw).__name__}")
        fields["policy_config"] = raw
    if token_vote is not None:
        fields["token_vote"] = token_vote
    if min_keep_fraction is not None:
        fields["min_keep_fraction"] = min_keep_fraction
    try:
        config = SGLangPolicyConfig(**fields)
    except ValidationError as exc:
        raise AdapterConfigError(f"invalid kv-policy flags: {exc}") from exc
    config.build_policy()  # validate the policy itself now, not in a scheduler process later
    return config


def model_info_from_hf_config(hf_config: dict[str, Any]) -> ModelInfo:
    """:class:`ModelInfo` from a Hugging Face ``config.json`` dict (text config of multimodal models too).

    Raises :class:`AdapterConfigError` when a field the policies need is missing.
    """
    config = hf_config.get("text_config") or hf_config
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        layers = int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterConfigError(f"the model config lacks a field the policy needs: {exc}") from exc
    return ModelInfo(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_kv_heads=kv_heads,
                     head_dim=head_dim, model_type=str(config.get("model_type", "unknown")))


def bind_policy(policy: EvictionPolicy, info: ModelInfo, name: str) -> None:
    """``policy.bind(info)``, its ValueError (e.g. surrogate dimensions) turned into :class:`AdapterConfigError`."""
    try:
        policy.bind(info)
    except ValueError as exc:
        raise AdapterConfigError(f"policy {name!r} does not fit the model: {exc}") from exc
