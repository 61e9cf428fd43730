"""Policy registry fed by the ``kvpolicy.policies`` entry-point group.

Built-in policies are declared in kvpolicy's own ``pyproject.toml`` under the same group as third-party
plugins, so both go through one code path. Loading is safe by default: entry points of other distributions
are imported only when allowlisted in the ``KVPOLICY_PLUGINS`` environment variable (comma-separated
policy names, or ``*`` alone for all). A plugin that fails to import is reported with its error, never skipped
silently. Discovery runs once per process (idempotent); :func:`reload_plugins` forces a rescan.

Built-ins (the entry points of the kvpolicy distribution itself) are registered first and cannot be replaced:
a plugin declaring a built-in's name is refused with a warning when allowlisted, and skipped like any other
plugin when not. ``none`` is reserved: it means "no policy" on every command line. A ``KVPOLICY_PLUGINS`` value
with parts that are not understood (``*`` next to names, ``a;b``, a name no installed package provides) still
fails closed, with a :class:`PluginWarning` naming each part.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Generic, TypeVar

from kvpolicy.policy import EvictionPolicy

ENTRY_POINT_GROUP = "kvpolicy.policies"
ALLOWLIST_ENV = "KVPOLICY_PLUGINS"
_BUILTIN_DISTRIBUTION = "kvpolicy"
NO_POLICY = "none"  # "no policy" on every command line; never a registry name
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # what an allowlist entry may look like

log = logging.getLogger(__name__)
T = TypeVar("T")


class UnknownPolicyError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class PluginWarning(UserWarning):
    """A plugin or ``KVPOLICY_PLUGINS`` entry that was not used as written (the message says why)."""


class Registry(Generic[T]):
    """Name → lazily loaded object. Duplicate names are rejected; unknown names list the known ones."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._loaders: dict[str, Callable[[], T]] = {}
        self._origins: dict[str, str] = {}
        self._loaded: dict[str, T] = {}

    def add(self, name: str, loader: Callable[[], T], origin: str) -> None:
        if name in self._loaders:
            raise ValueError(
                f"duplicate {self._kind} name {name!r}: registered by {self._origins[name]} and by {origin}"
            )
        self._loaders[name] = loader
        self._origins[name] = origin

    def get(self, name: str) -> T:
        if name not in self._loaders:
            raise UnknownPolicyError(f"unknown {self._kind} {name!r}; known: {', '.join(sorted(self)) or 'none'}")
        if name not in self._loaded:
            self._loaded[name] = self._loaders[name]()
        return self._loaded[name]

    def origin(self, name: str) -> str:
        return self._origins[name]

    def __contains__(self, name: object) -> bool:
        return name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._loaders))


@dataclass(frozen=True)
class SkippedPlugin:
    name: str
    distribution: str
    reason: str


_lock = threading.Lock()
_registry: Registry[type[EvictionPolicy]] | None = None
_skipped: list[SkippedPlugin] = []
_allowlist_problems: list[str] = []


def _parse_allowlist(raw: str) -> tuple[set[str] | None, list[str]]:
    """``(allowed, problems)``: allowed is None for "every plugin" (``*`` alone), else the allowlisted names;
    problems name each part of ``raw`` that was not understood (and is ignored: the list fails closed)."""
    items = [item.strip() for item in raw.split(",")]
    items = [item for item in items if item]  # "a," and surrounding spaces are harmless
    if items == ["*"]:
        return None, []
    allowed: set[str] = set()
    problems = []
    for item in items:
        if item == "*":
            problems.append(f"{ALLOWLIST_ENV}: '*' allows every plugin only on its own; next to names it is "
                            "ignored (set it to '*' alone, or list names)")
        elif not _NAME.fullmatch(item):
            problems.append(f"{ALLOWLIST_ENV}: {item!r} is not a policy name, ignored (separate names with "
                            "commas, e.g. a,b)")
        else:
            allowed.add(item)
    return allowed, problems


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=3)


def _load_entry_point(ep: metadata.EntryPoint, dist: str) -> Callable[[], type[EvictionPolicy]]:
    def load() -> type[EvictionPolicy]:
        try:
            obj = ep.load()
        except Exception as exc:
            raise ImportError(f"policy plugin {ep.name!r} ({dist}: {ep.value}) failed to load: {exc}") from exc
        if not (isinstance(obj, type) and issubclass(obj, EvictionPolicy)):
            raise TypeError(f"policy plugin {ep.name!r} ({dist}: {ep.value}) is not an EvictionPolicy subclass")
        return obj

    return load


def _discover() -> Registry[type[EvictionPolicy]]:
    registry: Registry[type[EvictionPolicy]] = Registry("policy")
    allow, problems = _parse_allowlist(os.environ.get(ALLOWLIST_ENV, ""))
    _skipped.clear()
    _allowlist_problems.clear()
    found = []
    seen: set[tuple[str, str, str]] = set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        if (dist, ep.name, ep.value) not in seen:  # the same distribution visible twice on sys.path
            seen.add((dist, ep.name, ep.value))
            found.append((ep, dist))
    # Built-ins first, whatever the order of sys.path: no other distribution can take their names.
    for ep, dist in found:
        if dist == _BUILTIN_DISTRIBUTION:
            registry.add(ep.name, _load_entry_point(ep, dist), origin=f"{dist} ({ep.value})")
    reserved = {*registry, NO_POLICY}
    provided = set()
    for ep, dist in found:
        if dist == _BUILTIN_DISTRIBUTION:
            continue
        provided.add(ep.name)
        if allow is not None and ep.name not in allow:
            reason = f"not in {ALLOWLIST_ENV}"
            if ep.name in reserved:
                reason += f"; it declares the reserved name {ep.name!r}, which it could not replace anyway"
            _skipped.append(SkippedPlugin(ep.name, dist, reason))
            log.info("kvpolicy: plugin %r from %s not loaded (not in %s)", ep.name, dist, ALLOWLIST_ENV)
            continue
        if ep.name in reserved:
            what = "means no policy" if ep.name == NO_POLICY else "is a built-in policy"
            reason = f"refused: {ep.name!r} {what}, and a plugin cannot replace it (rename the plugin's entry point)"
            _skipped.append(SkippedPlugin(ep.name, dist, reason))
            _warn(f"policy plugin {ep.name!r} from {dist} ({ep.value}) {reason}")
            continue
        registry.add(ep.name, _load_entry_point(ep, dist), origin=f"{dist} ({ep.value})")
    for name in sorted((allow or set()) - provided - reserved):
        problems.append(f"{ALLOWLIST_ENV}: no installed package provides a policy plugin named {name!r} "
                        f"(installed plugins: {', '.join(sorted(provided)) or 'none'})")
    _allowlist_problems.extend(problems)
    for problem in problems:
        _warn(problem)
    return registry


def _get_registry() -> Registry[type[EvictionPolicy]]:
    global _registry
    with _lock:
        if _registry is None:
            _registry = _discover()
        return _registry


def reload_plugins() -> None:
    """Rescan entry points (e.g. after installing a plugin or changing ``KVPOLICY_PLUGINS``)."""
    global _registry
    with _lock:
        _registry = None


def register_policy(name: str, policy_class: type[EvictionPolicy]) -> None:
    """Register a policy class in this process only (tests, notebooks). Duplicate names raise ValueError."""
    if not (isinstance(policy_class, type) and issubclass(policy_class, EvictionPolicy)):
        raise TypeError(f"{policy_class!r} is not an EvictionPolicy subclass")
    if name == NO_POLICY:
        raise ValueError(f"{NO_POLICY!r} is reserved: it means no policy")
    _get_registry().add(name, lambda: policy_class, origin=f"register_policy({policy_class.__qualname__})")


def available_policies() -> list[str]:
    """Names of all loadable policies, sorted."""
    return list(_get_registry())


def skipped_plugins() -> list[SkippedPlugin]:
    """Plugins found on the system but not loaded, with the reason."""
    _get_registry()
    return list(_skipped)


def allowlist_problems() -> list[str]:
    """What in ``KVPOLICY_PLUGINS`` was not understood or names no installed plugin (also warned about)."""
    _get_registry()
    return list(_allowlist_problems)


def get_policy_class(name: str) -> type[EvictionPolicy]:
    registry = _get_registry()
    if name not in registry:
        hidden = [s for s in _skipped if s.name == name]
        if hidden:
            raise UnknownPolicyError(
                f"policy {name!r} is provided by {hidden[0].distribution} but not allowlisted; "
                f"set {ALLOWLIST_ENV}={name} (comma-separated names, or '*') to load it"
            )
    cls = registry.get(name)
    return cls


def get_policy(name: str, **config) -> EvictionPolicy:
    """Instantiate policy ``name`` with its config fields given as keyword arguments (validated)."""
    cls = get_policy_class(name)
    policy = cls.from_kwargs(**config)
    policy.name = name  # type: ignore[misc]  # instance attribute: the name it was loaded under
    return policy
