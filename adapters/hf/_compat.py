"""The one place where the HF adapter meets differences between transformers (and torch) releases.

Supported: ``transformers >= 5.0`` and ``torch >= 2.6`` (the metadata carries these lower bounds and no upper
caps). Tested in CI: transformers 5.0.0 (oldest) and 5.25.0 (newest), with torch 2.13.0; SGLang's pin 5.19.0
runs in the SGLang environment; 5.23.0 was checked by hand. :func:`check_versions` runs before anything imports
``transformers.cache_utils``, so an older release is refused with the versions named instead of failing with an
ImportError or TypeError from inside transformers.

API differences handled here (and nowhere else):

- the cache layer's maximum length: abstract ``get_max_length()`` from 5.13 on, ``get_max_cache_shape()``
  before (:class:`CacheLayerCompat` defines both);
- ``get_mask_sizes``: the new tokens' ``cache_position`` tensor before 5.3, their count from 5.3 on
  (:func:`query_length`);
- ``Cache.crop``: an absolute length or, when negative, a count to remove before 5.13; only a negative count
  from 5.13 on (:func:`crop_to`);
- the model's cache keyword: ``past_key_values`` before 5.25, ``cache`` from 5.25 on (the old name still
  accepted, deprecated) (:func:`cache_kwarg`, :func:`pop_cache`).
"""

from __future__ import annotations

import inspect
from importlib import metadata

from packaging.version import Version

# Oldest releases the adapter supports; update docs/architecture.md and the README with them.
MIN_VERSIONS = {"transformers": "5.0", "torch": "2.6"}
# What was tested (the README's "Supported versions" says where).
TESTED_VERSIONS = {"transformers": ("5.0.0", "5.19.0", "5.23.0", "5.25.0"), "torch": ("2.13.0",)}


class UnsupportedVersionError(RuntimeError):
    """An installed library is older than the HF adapter supports."""


def _installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_versions(installed: dict[str, str | None] | None = None) -> dict[str, str]:
    """Return ``{package: version}`` for transformers and torch, or raise :class:`UnsupportedVersionError`
    naming the installed version and the supported range. ``installed`` overrides the lookup (for tests)."""
    found = {}
    for package, minimum in MIN_VERSIONS.items():
        version = installed[package] if installed is not None else _installed(package)
        supported = f">= {minimum} (tested: {', '.join(TESTED_VERSIONS[package])})"
        if version is None:
            raise UnsupportedVersionError(f"{package} is not installed; kvpolicy's HF adapter needs {package} "
                                          f"{supported}")
        if Version(version).release < Version(minimum).release:
            raise UnsupportedVersionError(f"{package} {version} is not supported by kvpolicy's HF adapter: it needs "
                                          f"{package} {supported}. Upgrade it, e.g. pip install '{package}>={minimum}'")
        found[package] = version
    return found


check_versions()

# Imported only after the version check passed.
from transformers.cache_utils import CacheLayerMixin  # noqa: E402


class CacheLayerCompat(CacheLayerMixin):
    """``CacheLayerMixin`` with the methods whose names changed between releases defined under every name."""

    def get_max_length(self) -> int:  # abstract from transformers 5.13 on
        return -1

    def get_max_cache_shape(self) -> int:  # the same method before 5.13
        return self.get_max_length()


def query_length(query_length_or_positions) -> int:
    """``get_mask_sizes``'s argument as a count: before 5.3 transformers passes the new tokens'
    ``cache_position`` tensor, from 5.3 on their number."""
    shape = getattr(query_length_or_positions, "shape", None)
    return int(shape[0]) if shape is not None else int(query_length_or_positions)


def crop_to(cache, length: int) -> None:
    """Cut a plain transformers cache (``DynamicCache``) back to its first ``length`` tokens.

    A negative count of tokens to remove means the same in every supported release (an absolute length does
    not: 5.13 refuses it). Nothing to remove is a no-op: ``crop(0)`` would empty the cache before 5.13.
    """
    remove = cache.get_seq_length() - length
    if remove < 0:
        raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} tokens to {length}")
    if remove:
        cache.crop(-remove)


_CACHE_KWARGS = ("cache", "past_key_values")


def cache_kwarg(model) -> str:
    """The keyword under which ``model``'s forward takes its cache in the installed release."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def pop_cache(kwargs: dict):
    """Remove the cache from a forward's keyword arguments, whichever name the caller used; None if absent."""
    given = [name for name in _CACHE_KWARGS if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError("both `cache` and `past_key_values` were given; pass the cache once")
    found = kwargs.pop(given[0]) if given else None
    for name in _CACHE_KWARGS:
        kwargs.pop(name, None)
    return found
