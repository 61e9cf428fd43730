"""User-facing configuration of the SGLang adapter (validated by pydantic; no SGLang import here).

What is configured:

- the policy: a registry name plus its own config fields (``--kv-policy NAME --kv-policy-config JSON``);
- the granularity of eviction (:class:`Granularity`): per (layer, KV head) entry, the default, or per token,
  where the per-entry decisions of a token are combined by a :class:`TokenVote` and the token's entries are
  freed together (kept for comparison);
- the slot expansion: logical token slots per dense token of KV memory (``--kv-slot-expansion``).
"""

from __future__ import annotations

import enum
import json
import os
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, model_validator

from kvpolicy.adapters.sglang.requests import AllowedPolicy, RequestPolicies, parse_allow
from kvpolicy.config import SelectionMode, StrictScalarModel
from kvpolicy.policy import EvictionPolicy, ModelInfo, OraclePolicy
from kvpolicy.registry import NO_POLICY, UnknownPolicyError, get_policy_class

BACKEND_NAME = "kvpolicy"  # --radix-cache-backend
ATTENTION_BACKEND = "kvpolicy_rows"  # --attention-backend off CUDA: torch, per request
TRITON_ATTENTION_BACKEND = "kvpolicy_triton"  # --attention-backend on CUDA: the Triton head-row kernels
ATTENTION_BACKENDS = (ATTENTION_BACKEND, TRITON_ATTENTION_BACKEND)  # every backend that reads the head-row pool
CONFIG_ENV = "KVPOLICY_SGLANG_CONFIG"  # the launcher's policy configuration, read by the scheduler processes


def attention_backend_for(device: str) -> str:
    """The head-row attention backend for a server on ``device`` (SGLang's ``--device``, e.g. ``cuda:0``):
    ``kvpolicy_triton`` on CUDA, ``kvpolicy_rows`` elsewhere (CPU, and devices the Triton kernels were not
    checked on)."""
    return TRITON_ATTENTION_BACKEND if device.split(":")[0] == "cuda" else ATTENTION_BACKEND


class AdapterConfigError(ValueError):
    """An invalid or unsupported ``--kv-policy`` / ``--kv-policy-config`` combination (clear message)."""


class Granularity(str, enum.Enum):
    """What one eviction frees. ``head``: the (layer, KV head) entry the policy dropped. ``token``: all of a
    token's entries at once, when the :class:`TokenVote` over its entries says so."""

    HEAD = "head"
    TOKEN = "token"


class TokenVote(str, enum.Enum):
    """How the per-(layer, kv_head) keep decisions of one token become the token's decision.

    - ``any`` (default): keep the token if *any* layer/head keeps it. Never drops an entry the per-head policy
      wanted, so attention over kept tokens is a superset of what per-head pruning would give; it frees less.
    - ``fraction``: keep the token if at least ``min_keep_fraction`` of its (layer, head) entries are kept
      (``min_keep_fraction=0.5`` is a majority vote). Frees more, may drop entries some heads wanted.
    """

    ANY = "any"
    FRACTION = "fraction"


class SGLangPolicyConfig(StrictScalarModel):
    """What ``--kv-policy`` / ``--kv-policy-config`` and the token vote resolve to.

    Numbers must be numbers (``"0.5"`` is refused, not converted): the flags arrive typed from argparse and the
    policy config from JSON."""

    # "constants": +-inf thresholds survive the JSON hand-off to the scheduler as Infinity/-Infinity
    # (pydantic's default writes null, which would silently turn "prune nothing" into the default threshold).
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    policy: str = Field(min_length=1)
    policy_config: dict[str, Any] = Field(default_factory=dict)
    granularity: Granularity = Granularity.HEAD
    token_vote: TokenVote = TokenVote.ANY
    min_keep_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    # Logical slots per dense token: pruned entries free rows, and new tokens need slots as well as rows.
    slot_expansion: int = Field(default=2, ge=1, le=16)
    # --kv-policy-allow: the policies (and config ranges) requests may choose; None: every request gets `policy`.
    allow: dict[str, AllowedPolicy] | None = None

    @model_validator(mode="after")
    def _vote_only_with_token_granularity(self) -> SGLangPolicyConfig:
        # By value, not by which fields were given, so that a full dump of a valid config reads back.
        default_fraction = type(self).model_fields["min_keep_fraction"].default
        if self.granularity is Granularity.HEAD and (self.token_vote is not TokenVote.ANY
                                                     or self.min_keep_fraction != default_fraction):
            raise ValueError("token_vote and min_keep_fraction apply to granularity='token' only")
        if self.token_vote is TokenVote.ANY and self.min_keep_fraction != default_fraction:
            raise ValueError("min_keep_fraction applies to token_vote='fraction' only")
        return self

    def request_policies(self) -> RequestPolicies:
        """The per-request choice this server offers (:mod:`kvpolicy.adapters.sglang.requests`); raises
        :class:`AdapterConfigError` for an allowlist that cannot be served."""
        try:
            return RequestPolicies(self.policy, self.policy_config, self.allow)
        except ValueError as exc:
            raise AdapterConfigError(str(exc)) from exc

    def build_policies(self, default: EvictionPolicy | None = None) -> dict[str, EvictionPolicy]:
        """``{name: policy}`` for the default policy (``default`` when already built) and every other policy requests
        may choose, each built once (``none`` needs nothing)."""
        choices = self.request_policies()
        policies = {self.policy: self.build_policy() if default is None else default}
        for name in choices.names():
            if name not in policies:
                other = self.model_copy(update={"policy": name, "policy_config": choices.server_config(name)})
                policies[name] = other.build_policy()
        return policies

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
        except Exception as exc:  # a plugin's constructor may raise anything: still a refusal, not a traceback
            raise AdapterConfigError(f"policy {self.policy!r} cannot be built from --kv-policy-config: "
                                     f"{type(exc).__name__}: {exc}") from exc
        if policy.config.mode is not SelectionMode.THRESHOLD:
            raise AdapterConfigError(
                f"the SGLang adapter supports threshold selection only (got {policy.config.mode.value}): "
                "ratio/budget rank a whole prefill, so a compressed prefix cached for one request would not be "
                "what another request sharing it would have kept"
            )
        policy.name = self.policy  # type: ignore[misc]
        return policy


def parse_policy_flags(policy: str | None, policy_config_json: str | None, **flags: Any) -> SGLangPolicyConfig | None:
    """Turn the raw flag strings into a validated config; None when ``--kv-policy`` was not given or is ``none``
    (no policy: plain SGLang, as ``none`` means in kvpolicy's other command lines). The policy is built once to
    validate it: a bad config is refused here, not in a scheduler process later."""
    parsed = parse_and_build(policy, policy_config_json, **flags)
    return None if parsed is None else parsed[0]


def parse_and_build(
    policy: str | None,
    policy_config_json: str | None,
    *,
    granularity: str | None = None,
    token_vote: str | None = None,
    min_keep_fraction: float | None = None,
    slot_expansion: int | None = None,
    allow: str | None = None,
) -> tuple[SGLangPolicyConfig, EvictionPolicy] | None:
    """:func:`parse_policy_flags` that also returns the policy it built (the launcher builds it once)."""
    if policy is None:
        if policy_config_json is not None:
            raise AdapterConfigError("--kv-policy-config given without --kv-policy")
        return None
    if policy == NO_POLICY:
        if allow is not None:
            raise AdapterConfigError(f"--kv-policy-allow needs a default policy: --kv-policy NAME serves requests "
                                     f"that name none (list {NO_POLICY} in --kv-policy-allow to let requests run "
                                     "without eviction)")
        given = [flag for flag, value in (("--kv-policy-config", policy_config_json), ("--kv-granularity", granularity),
                                          ("--kv-token-vote", token_vote),
                                          ("--kv-min-keep-fraction", min_keep_fraction),
                                          ("--kv-slot-expansion", slot_expansion)) if value is not None]
        if given:
            raise AdapterConfigError(f"--kv-policy {NO_POLICY} (no policy) takes no {', '.join(given)}")
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
    # Explicit flags that cannot apply are refused even when they repeat a default (the model checks values).
    if granularity in (None, Granularity.HEAD.value) and (token_vote is not None or min_keep_fraction is not None):
        raise AdapterConfigError("--kv-token-vote and --kv-min-keep-fraction apply to granularity='token' only "
                                 "(add --kv-granularity token)")
    if min_keep_fraction is not None and token_vote != TokenVote.FRACTION.value:
        raise AdapterConfigError("min_keep_fraction applies to token_vote='fraction' only (add --kv-token-vote "
                                 "fraction)")
    for name, value in (("granularity", granularity), ("token_vote", token_vote),
                        ("min_keep_fraction", min_keep_fraction), ("slot_expansion", slot_expansion)):
        if value is not None:
            fields[name] = value
    if allow is not None:
        try:
            fields["allow"] = parse_allow(allow)
        except ValueError as exc:
            raise AdapterConfigError(str(exc)) from exc
    try:
        config = SGLangPolicyConfig(**fields)
    except ValidationError as exc:
        raise AdapterConfigError(f"invalid kv-policy flags: {exc}") from exc
    policy = config.build_policy()
    config.request_policies()  # refuses an allowlist that cannot be served
    return config, policy


def model_info_from_hf_config(hf_config: dict[str, Any]) -> ModelInfo:
    """:class:`ModelInfo` from a Hugging Face ``config.json`` dict (text config of multimodal models too).

    Raises :class:`AdapterConfigError` when a field the policies need is missing.
    """
    try:
        return ModelInfo.from_hf_config(hf_config)
    except ValueError as exc:
        raise AdapterConfigError(str(exc)) from exc


def bind_policy(policy: EvictionPolicy, info: ModelInfo, name: str) -> None:
    """``policy.bind(info)``, its ValueError (e.g. surrogate dimensions) turned into :class:`AdapterConfigError`."""
    try:
        policy.bind(info)
    except ValueError as exc:
        raise AdapterConfigError(f"policy {name!r} does not fit the model: {exc}") from exc
    except Exception as exc:  # a plugin's bind may raise anything: still a refusal, not a traceback
        raise AdapterConfigError(f"policy {name!r} does not fit the model: {type(exc).__name__}: {exc}") from exc


def config_from_env(environ: dict[str, str] | None = None) -> SGLangPolicyConfig | None:
    """The policy configuration the launcher set (``KVPOLICY_SGLANG_CONFIG``), None when there is none."""
    raw = (os.environ if environ is None else environ).get(CONFIG_ENV)
    if not raw:
        return None
    try:
        return SGLangPolicyConfig(**json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise AdapterConfigError(f"{CONFIG_ENV} is not a valid kvpolicy SGLang config: {exc}") from exc
