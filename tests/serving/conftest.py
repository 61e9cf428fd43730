"""Serving tests start real SGLang servers (CPU); they skip cleanly when SGLang is not importable."""

from __future__ import annotations

import importlib.util

import pytest


def sglang_or_skip() -> None:
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("SGLang is not installed (see docs/sglang.md)", allow_module_level=True)
    from tests.support.sglang_cpu_standins import install

    install()
    pytest.importorskip("sglang.srt.entrypoints.http_server", reason="SGLang's HTTP server does not import")
