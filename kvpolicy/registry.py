"""Policy registry fed by the ``kvpolicy.policies`` entry-point group.

Built-in policies are declared in kvpolicy's own ``pyproject.toml`` under the same group as third-party
plugins, so both go through one code path. Loading is safe by default: entry points of other distributions
are imported only when allowlisted in the ``KVPOLICY_PLUGINS`` environment variable (comma-separated
policy names, or ``*`` for all). A plugin that fails to import is reported with its error, never skipped
silently. Discovery runs once per process (idempotent); :func:`reload_plugins` forces a rescan.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Generic, TypeVar

from kvpolicy.policy import EvictionPolicy

ENTRY_POINT_GROUP = "kvpolicy.policies"
ALLOWLIST_ENV = "KVPOLICY_PLUGINS"
_BUILTIN_DISTRIBUTION = "kvpolicy"

log = logging.getLogger(__name__)
T = TypeVar("T")


class UnknownPolicyError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


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


def _allowlist() -> set[str] | None:
    """None means "everything allowed"; otherwise the set of allowlisted third-party policy names."""
    raw = os.environ.get(ALLOWLIST_ENV, "").strip()
    if raw == "*":
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


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
    allow = _allowlist()
    _skipped.clear()
    seen: set[tuple[str, str]] = set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        if (ep.name, ep.value) in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add((ep.name, ep.value))
        builtin = dist == _BUILTIN_DISTRIBUTION
        if not builtin and allow is not None and ep.name not in allow:
            _skipped.append(SkippedPlugin(ep.name, dist, f"not in {ALLOWLIST_ENV}"))
            log.info("kvpolicy: plugin %r from %s not loaded (not in %s)", ep.name, dist, ALLOWLIST_ENV)
            continue
        registry.add(ep.name, _load_entry_point(ep, dist), origin=f"{dist} ({ep.value})")
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
    _get_registry().add(name, lambda: policy_class, origin=f"register_policy({policy_class.__qualname__})")


def available_policies() -> list[str]:
    """Names of all loadable policies, sorted."""
    return list(_get_registry())


def skipped_plugins() -> list[SkippedPlugin]:
    """Plugins found on the system but not loaded, with the reason."""
    _get_registry()
    return list(_skipped)


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
