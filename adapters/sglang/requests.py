"""A policy per request: the operator's allowlist, a request's choice, and the prefix-cache namespace it gets.

Pure pydantic and the policy registry; importing this module does not import SGLang.

**The channel.** A request names its policy in SGLang's per-request custom parameters,
``sampling_params.custom_params`` (JSON scalars, lists and flat objects; carried from the HTTP server to every
scheduler rank and available to ``/generate`` and the OpenAI-compatible routes)::

    {"input_ids": [...], "sampling_params": {"max_new_tokens": 16,
     "custom_params": {"kv_policy": "window", "kv_policy_config": {"window": 32}}}}

A request without ``kv_policy`` gets the server's ``--kv-policy``. ``kv_policy`` may be ``none`` (no eviction)
when the operator allows it.

**The limits.** ``--kv-policy-allow`` lists the policies requests may name: ``kvzap_mlp,window,none``, or a JSON
object that also gives each one its server-side config and the ranges requests may pick::

    {"kvzap_mlp": {"limits": {"threshold": {"min": -6, "max": -2}}},
     "window": {"config": {"window": 64}, "limits": {"window": {"one_of": [16, 32, 64]}}},
     "none": {}}

Each allowed policy is built once per scheduler (surrogates are loaded once); the server's default takes its config
from ``--kv-policy-config``. A request may set only the fields that have a limit, and only the selection fields
(:data:`PER_REQUEST_FIELDS`): they decide which scores are dropped, never how scores are computed, so every request
of a policy shares its one scorer. Anything else (an unknown or disallowed policy, a field without a limit, a value
outside it, a config the policy refuses) raises :class:`RequestPolicyError`, which SGLang answers with HTTP 400.

**The prefix rule.** Every request gets a prefix-cache namespace, ``kvpolicy:NAME:DIGEST`` (``DIGEST``: a hash of
its full resolved config; ``kvpolicy:none`` for no policy), appended to SGLang's ``extra_key``, which namespaces the
radix tree. A prefix is reused only by requests of the same policy and config: a prefix pruned by one policy holds
exactly what that policy keeps, which is not what another would keep, and an unpruned prefix reused by a policy
would escape its pruning (a request frees only tokens it computed). Within a namespace the window rule of
:class:`~kvpolicy.adapters.sglang.row_tree.HeadRowRadixCache` applies with the namespace's window.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, NamedTuple

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from kvpolicy.config import PolicyConfig, SelectionMode, StrictScalarModel
from kvpolicy.policy import OraclePolicy
from kvpolicy.registry import NO_POLICY, UnknownPolicyError, get_policy_class

CUSTOM_POLICY = "kv_policy"  # sampling_params.custom_params key: the policy's registry name (or "none")
CUSTOM_CONFIG = "kv_policy_config"  # sampling_params.custom_params key: the request's config fields
PER_REQUEST_FIELDS = ("threshold", "window", "sinks")  # selection fields a limit may open to requests
NAMESPACE_PREFIX = "kvpolicy:"
META_KEY = "kvpolicy"  # meta_info key of the per-request report


class RequestPolicyError(ValueError):
    """A request's policy choice is refused (SGLang turns a ValueError into HTTP 400 with this message)."""

    status_code = 400


class FieldLimit(StrictScalarModel):
    """The values of one config field that requests may pick: a closed range (``min`` / ``max``, either may be
    left out; ``-Infinity`` / ``Infinity`` allowed) or a list (``one_of``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    min: float | None = None
    max: float | None = None
    one_of: tuple[float, ...] | None = Field(default=None, min_length=1)

    @field_validator("min", "max")
    @classmethod
    def _not_nan(cls, value: float | None) -> float | None:
        if value is not None and math.isnan(value):
            raise ValueError("a limit must not be NaN")
        return value

    @field_validator("one_of")
    @classmethod
    def _no_nan_choice(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and any(math.isnan(v) for v in value):
            raise ValueError("one_of must not hold NaN")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> FieldLimit:
        ranged = self.min is not None or self.max is not None
        if ranged == (self.one_of is not None):
            raise ValueError("give a range (min and/or max) or a list (one_of), not both and not neither")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def describe(self) -> str:
        if self.one_of is not None:
            return "in {" + ", ".join(_number(v) for v in self.one_of) + "}"
        low = "-inf" if self.min is None else _number(self.min)
        high = "inf" if self.max is None else _number(self.max)
        return f"in [{low}, {high}]"

    def allows(self, value: float) -> bool:
        if self.one_of is not None:
            return value in self.one_of
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


class AllowedPolicy(StrictScalarModel):
    """One entry of ``--kv-policy-allow``: the policy's server-side config (not for the server's default, whose
    config is ``--kv-policy-config``) and the per-request limits."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    config: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, FieldLimit] = Field(default_factory=dict)

    @field_validator("limits")
    @classmethod
    def _selection_fields_only(cls, limits: dict[str, FieldLimit]) -> dict[str, FieldLimit]:
        other = sorted(set(limits) - set(PER_REQUEST_FIELDS))
        if other:
            raise ValueError(f"limits on {', '.join(other)}: only the selection fields {', '.join(PER_REQUEST_FIELDS)} "
                             "can vary per request (the other fields change how a policy scores, and each allowed "
                             "policy has one scorer per server)")
        return limits


def parse_allow(text: str) -> dict[str, AllowedPolicy]:
    """``--kv-policy-allow``: comma-separated policy names, or a JSON object ``{name: {"config": {...}, "limits":
    {field: {"min": .., "max": ..} | {"one_of": [..]}}}}``. Raises ``ValueError`` naming the problem."""
    text = text.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--kv-policy-allow is not valid JSON: {exc}") from exc
        allowed = {}
        for name, entry in raw.items():
            try:
                allowed[name] = AllowedPolicy.model_validate(entry if entry is not None else {})
            except ValidationError as exc:
                raise ValueError(f"--kv-policy-allow entry {name!r}: {_pydantic_reason(exc)}") from exc
    else:
        names = [part.strip() for part in text.split(",")]
        if not all(names):
            raise ValueError(f"--kv-policy-allow {text!r}: empty policy name (write NAME,NAME,... or a JSON object)")
        if len(set(names)) != len(names):
            raise ValueError(f"--kv-policy-allow {text!r} names a policy twice")
        allowed = {name: AllowedPolicy() for name in names}
    if not allowed:
        raise ValueError("--kv-policy-allow names no policy")
    return allowed


def _pydantic_reason(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(parts)


class Choice(NamedTuple):
    """What a request runs with: ``policy`` (a registry name, or ``none``), its resolved ``config`` (None for
    ``none``) and its prefix-cache ``namespace``."""

    policy: str
    config: PolicyConfig | None
    namespace: str

    @property
    def window(self) -> int:
        """The window rule's window in this namespace (0 without a policy: nothing is pruned there)."""
        return 0 if self.config is None else self.config.window

    def request_fields(self) -> dict[str, float]:
        """The per-request fields of the resolved config (what the meta_info report echoes)."""
        if self.config is None:
            return {}
        return {name: getattr(self.config, name) for name in PER_REQUEST_FIELDS}


def namespace_of(policy: str, config: PolicyConfig | None) -> str:
    """``kvpolicy:NAME:DIGEST``: the same for the same policy and resolved config, in every process."""
    if config is None:
        return NAMESPACE_PREFIX + NO_POLICY
    canonical = json.dumps(config.model_dump(), sort_keys=True, default=str)  # -inf stays "-Infinity", not null
    return f"{NAMESPACE_PREFIX}{policy}:{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def with_namespace(extra_key: str | None, namespace: str) -> str:
    """SGLang's ``extra_key`` with the namespace appended last (a client's own key is kept in front)."""
    return f"{extra_key}|{namespace}" if extra_key else namespace


class RequestPolicies:
    """The server's per-request policy settings (``--kv-policy`` is the default; ``allowed`` from
    ``--kv-policy-allow``, None: requests may not choose). Resolves a request's custom parameters into a
    :class:`Choice`; the same in the HTTP server process and every scheduler rank."""

    def __init__(self, default: str, default_config: dict[str, Any],
                 allowed: dict[str, AllowedPolicy] | None) -> None:
        self.default_name = default
        self.allowed = dict(allowed) if allowed is not None else None
        self._configs: dict[str, dict[str, Any]] = {default: dict(default_config)}
        self._limits: dict[str, dict[str, FieldLimit]] = {default: {}}
        for name, entry in (self.allowed or {}).items():
            if name == NO_POLICY:
                if entry.config or entry.limits:
                    raise ValueError(f"--kv-policy-allow: {NO_POLICY} (no policy) takes no config or limits")
                continue
            if name == default and entry.config:
                raise ValueError(f"--kv-policy-allow: {name!r} is the server's --kv-policy; its config is "
                                 "--kv-policy-config, not an allow entry's")
            if name != default:
                self._configs[name] = dict(entry.config)
            self._limits[name] = dict(entry.limits)
        self._classes = {name: _servable_class(name) for name in self._configs}
        self._base = {name: self._validated(name, config, where="server config")
                      for name, config in self._configs.items()}
        self.default = self._choice(default, self._base[default])

    @property
    def per_request(self) -> bool:
        """Whether requests may choose (``--kv-policy-allow`` was given)."""
        return self.allowed is not None

    def names(self) -> list[str]:
        """The policies this server builds (the default first); ``none`` needs nothing built."""
        return list(self._configs)

    def server_config(self, name: str) -> dict[str, Any]:
        """The server-side config of an allowed policy (what it is built from)."""
        return dict(self._configs[name])

    def windows(self) -> list[int]:
        return [config.window for config in self._base.values()] + ([0] if NO_POLICY in (self.allowed or {}) else [])

    def resolve(self, custom_params: Any) -> Choice:
        """The :class:`Choice` for a request's ``sampling_params.custom_params``; :class:`RequestPolicyError` with
        the reason when it is refused."""
        # SGLang checks custom_params' own shape (None or a JSON object); anything else is not ours to judge.
        params = custom_params if isinstance(custom_params, dict) else {}
        unknown = sorted(k for k in params if str(k).startswith(CUSTOM_POLICY) and k not in (CUSTOM_POLICY,
                                                                                              CUSTOM_CONFIG))
        if unknown:
            raise RequestPolicyError(f"unknown custom_params {', '.join(map(repr, unknown))} (kvpolicy reads "
                                     f"{CUSTOM_POLICY!r} and {CUSTOM_CONFIG!r})")
        name, override = params.get(CUSTOM_POLICY), params.get(CUSTOM_CONFIG)
        if name is None:
            if override is not None:
                raise RequestPolicyError(f"custom_params.{CUSTOM_CONFIG} needs custom_params.{CUSTOM_POLICY} (the "
                                         "policy it configures)")
            return self.default
        if not self.per_request:
            raise RequestPolicyError(f"this server serves one policy ({self.default_name!r}) and does not let "
                                     f"requests choose (start it with --kv-policy-allow); got {CUSTOM_POLICY}="
                                     f"{name!r}")
        if not isinstance(name, str):
            raise RequestPolicyError(f"custom_params.{CUSTOM_POLICY} must be a policy name, got {name!r}")
        if name != self.default_name and name not in self.allowed:
            raise RequestPolicyError(f"policy {name!r} is not allowed on this server (allowed: "
                                     f"{', '.join(self._allowed_names())})")
        if override is None:
            override = {}
        if not isinstance(override, dict):
            raise RequestPolicyError(f"custom_params.{CUSTOM_CONFIG} must be an object, got {override!r}")
        if name == NO_POLICY:
            if override:
                raise RequestPolicyError(f"{NO_POLICY} (no policy) takes no {CUSTOM_CONFIG}")
            return self._choice(NO_POLICY, None)
        limits = self._limits.get(name, {})
        for field, value in override.items():
            limit = limits.get(field)
            if limit is None:
                settable = "; ".join(f"{f} {lim.describe()}" for f, lim in limits.items()) or "none"
                raise RequestPolicyError(f"{name}: field {field!r} cannot be set per request on this server "
                                         f"(settable: {settable})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise RequestPolicyError(f"{name}: {field} must be a number, got {value!r}")
            if not limit.allows(value):
                raise RequestPolicyError(f"{name}: {field}={_number(value)} is outside this server's limit "
                                         f"({field} {limit.describe()})")
        if not override:
            return self._choice(name, self._base[name])
        config = self._validated(name, {**self._configs[name], **override}, where=CUSTOM_CONFIG)
        return self._choice(name, config)

    def _allowed_names(self) -> list[str]:
        return list(dict.fromkeys([self.default_name, *(self.allowed or {})]))

    def _choice(self, name: str, config: PolicyConfig | None) -> Choice:
        return Choice(name, config, namespace_of(name, config))

    def _validated(self, name: str, config: dict[str, Any], *, where: str) -> PolicyConfig:
        error = RequestPolicyError if where == CUSTOM_CONFIG else ValueError
        try:
            resolved = self._classes[name].config_class(**config)
        except (ValidationError, ValueError, TypeError) as exc:
            reason = _pydantic_reason(exc) if isinstance(exc, ValidationError) else str(exc)
            raise error(f"{name}: invalid {where}: {reason}") from exc
        if resolved.mode is not SelectionMode.THRESHOLD:
            hint = "" if where == CUSTOM_CONFIG else ' (give it a threshold: {"config": {"threshold": ...}})'
            raise error(f"{name}: the SGLang adapter serves threshold selection only, got {resolved.mode.value}"
                        f"{hint}")
        return resolved


def _servable_class(name: str):
    """The registry class of a policy that may be served; ``ValueError`` for unknown names and oracles."""
    try:
        policy_class = get_policy_class(name)
    except UnknownPolicyError as exc:
        raise ValueError(str(exc)) from exc
    except (ImportError, TypeError) as exc:
        raise ValueError(f"policy {name!r} cannot be loaded: {exc}") from exc
    if issubclass(policy_class, OraclePolicy):
        raise ValueError(f"policy {name!r} is an oracle (offline scoring and training only), it cannot be served")
    return policy_class
