"""The version gate in front of SGLang's internals.

The adapter subclasses SGLang's KV cache, token allocator, classic radix cache and torch-native attention
backend, and hooks private methods of its KV-cache configurator and scheduler. None of that is a public API, so
an SGLang version that was not checked is refused with a clear message instead of corrupting the KV pool at
run time. Modules that touch SGLang import this one first.
"""

from __future__ import annotations

from importlib import metadata

SUPPORTED_SGLANG_VERSIONS = ("0.5.23",)


class UnsupportedSGLangVersion(RuntimeError):
    pass


def installed_sglang_version() -> str | None:
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def check_sglang_version(version: str | None = None) -> str:
    """Return the installed SGLang version, or raise :class:`UnsupportedSGLangVersion`."""
    version = installed_sglang_version() if version is None else version
    if version is None:
        raise UnsupportedSGLangVersion(
            "SGLang is not installed; the kvpolicy SGLang adapter supports sglang "
            + ", ".join(SUPPORTED_SGLANG_VERSIONS) + " (see docs/sglang.md)"
        )
    if version not in SUPPORTED_SGLANG_VERSIONS:
        raise UnsupportedSGLangVersion(
            f"sglang {version} is not supported by the kvpolicy SGLang adapter (supported: "
            f"{', '.join(SUPPORTED_SGLANG_VERSIONS)}). It subclasses SGLang's KV pool, allocator, radix cache and "
            "attention backend and hooks private methods, so each version must be checked before use; see "
            "docs/sglang.md"
        )
    return version
