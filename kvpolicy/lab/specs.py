"""The policy-spec grammar of the lab's command lines (``kvpolicy compare``, ``demo``, ``bench-serve``).

``NAME[:key=value[,key=value...]]``

- ``NAME``: a registry name (``kvpolicy list``), or ``none`` for no policy (the full cache), which takes no keys.
- ``value``: a JSON scalar where it parses as one (``-4``, ``0.5``, ``1e-3``, ``true``, ``null``, ``"text"``), and
  ``inf`` / ``-inf``; anything else is taken as text (``surrogate=/path/to/dir``, ``scope=model``). JSON double
  quotes force text (``key="8"``). A value cannot contain ``,`` or ``|``; lists and objects are not scalars and
  are refused.
- ``|`` in a value: a sweep, one spec per alternative (``threshold=-4|-2|0``); sweeps over several keys expand
  to their cartesian product, in the order written.

Typed values matter: policy configs refuse text where a number is expected (``threshold="-4"``), so the grammar
turns ``threshold=-4`` into the number -4 here.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvpolicy.registry import NO_POLICY

GRAMMAR = "NAME[:key=value[,key=value...]], '|' in a value sweeps it, 'none' = no policy"
_INFINITIES = {"inf": math.inf, "+inf": math.inf, "-inf": -math.inf}


class SpecError(ValueError):
    """A policy spec that does not parse, or does not name a valid configuration (the message says which)."""


@dataclass(frozen=True)
class PolicySpec:
    """One configuration to run: a registry name (or ``none``) and its config fields, typed."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def is_none(self) -> bool:
        return self.name == NO_POLICY

    @property
    def label(self) -> str:
        """Row label: ``none (full cache)``, ``window`` or ``window(window=64)`` (the surrogate path left out)."""
        if self.is_none:
            return f"{NO_POLICY} (full cache)"
        inner = ", ".join(f"{k}={v}" for k, v in self.config.items() if k != "surrogate")
        return f"{self.name}({inner})" if inner else self.name


def parse_value(text: str) -> Any:
    """A JSON scalar (number, true/false, null, "string") or ``inf``/``-inf`` when ``text`` is one; else ``text``.

    Raises :class:`SpecError` for a JSON list or object (not a scalar)."""
    if text.lower() in _INFINITIES:
        return _INFINITIES[text.lower()]
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    if isinstance(value, (list, dict)):
        raise SpecError(f"value {text!r} is a JSON {type(value).__name__}; only scalars are accepted "
                        "(numbers, true/false, null, text)")
    return value


def parse_spec(text: str) -> list[PolicySpec]:
    """Parse one spec; a spec with sweeps gives one :class:`PolicySpec` per combination (cartesian product)."""
    name, colon, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise SpecError(f"policy spec {text!r} has no policy name (grammar: {GRAMMAR})")
    keys: list[str] = []
    choices: list[list[Any]] = []
    for item in (part.strip() for part in rest.split(",")) if colon else ():
        if not item:
            raise SpecError(f"policy spec {text!r}: empty key=value item (a stray ',' or ':'?)")
        key, equals, raw = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise SpecError(f"policy spec {text!r}: {item!r} is not key=value (grammar: {GRAMMAR})")
        if key in keys:
            raise SpecError(f"policy spec {text!r}: key {key!r} given twice")
        alternatives = [a.strip() for a in raw.split("|")]
        if len(alternatives) > 1 and not all(alternatives):
            raise SpecError(f"policy spec {text!r}: the sweep {raw!r} of {key!r} has an empty alternative")
        try:
            values = [parse_value(a) for a in alternatives]
        except SpecError as exc:
            raise SpecError(f"policy spec {text!r}, key {key!r}: {exc}") from None
        keys.append(key)
        choices.append(values)
    if name == NO_POLICY and keys:
        raise SpecError(f"policy spec {text!r}: {NO_POLICY!r} (no policy, the full cache) takes no configuration")
    return [PolicySpec(name, dict(zip(keys, combo))) for combo in itertools.product(*choices)]


def parse_specs(texts: Iterable[str]) -> list[PolicySpec]:
    """Parse and expand every spec, in order."""
    return [spec for text in texts for spec in parse_spec(text)]


def describe_error(exc: BaseException) -> str:
    """A one-line reason: pydantic errors as ``field: message; ...``, others as their message."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            parts.append(f"{where}: {error['msg']}" if where else error["msg"])
        return "; ".join(parts)
    return str(exc) or type(exc).__name__


def check_specs(specs: Sequence[PolicySpec], configure: Callable[[PolicySpec], dict[str, Any]] | None = None,
                model_info=None) -> list[str]:
    """Every problem of ``specs``, one message each (identical ones once), found without running anything.

    For each spec except ``none``: the name must be registered and load, the policy must build from
    ``configure(spec)`` (default: ``spec.config``; validates the config and loads files such as a surrogate),
    and, when ``model_info`` (a :class:`kvpolicy.ModelInfo`) is given, bind to that model.
    """
    from kvpolicy.registry import UnknownPolicyError, get_policy_class

    problems: list[str] = []
    for spec in specs:
        if spec.is_none:
            continue
        try:
            cls = get_policy_class(spec.name)
        except Exception as exc:  # unknown (lists the known names), or a plugin that fails to load
            message = f"{spec.name!r}: {describe_error(exc)}"
            if isinstance(exc, UnknownPolicyError):
                message += f" ({NO_POLICY!r} = no policy, the full cache)"
        else:
            try:
                policy = cls.from_kwargs(**(configure(spec) if configure is not None else spec.config))
                if model_info is not None:
                    policy.bind(model_info)
                continue
            except Exception as exc:  # a policy's own checks (files, dimensions) raise what they raise
                message = f"{spec.label}: {describe_error(exc)}"
        if message not in problems:
            problems.append(message)
    return problems
