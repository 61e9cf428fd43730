"""Fixtures for the kernel tests: devices and poisoned allocations."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU needs TRITON_INTERPRET=1"),
                 id="cpu"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with a value no kernel writes: NaN for floats, the type's minimum for integers."""
    if t.dtype == torch.bool or t.numel() == 0:
        return t
    return t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make ``torch.empty``/``empty_like``/``Tensor.new_empty`` return poisoned memory, so an output element a
    kernel forgets to write shows up as NaN (or INT_MIN) instead of whatever the allocator left there."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison_(new_empty(self, *a, **k)))
