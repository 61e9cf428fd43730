"""The CPU stand-ins match the documented semantics of what they stand in for (or refuse loudly)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from tests.support import sglang_cpu_standins as standins


def _module(name: str):
    """The stand-in module for ``name`` (built by the finder, independent of what is installed)."""
    spec = standins.StandinFinder().find_spec(name)
    module = type(sys)(name)
    spec.loader.exec_module(module)
    return module


def test_assign_req_to_token_pool_cpu_writes_each_requests_slots():
    req_to_token = torch.zeros((5, 12), dtype=torch.int32)
    req_pool_indices = torch.tensor([3, 1, 4])
    start = torch.tensor([2, 0, 5])
    end = torch.tensor([5, 1, 9])
    out_cache_loc = torch.arange(100, 108)  # 3 + 1 + 4 slots, packed request after request
    kernel = _module("sgl_kernel")
    kernel.assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end, out_cache_loc, 12)
    expected = torch.zeros((5, 12), dtype=torch.int32)
    expected[3, 2:5] = torch.tensor([100, 101, 102])
    expected[1, 0:1] = torch.tensor([103])
    expected[4, 5:9] = torch.tensor([104, 105, 106, 107])
    assert torch.equal(req_to_token, expected)


def test_assign_req_to_token_pool_cpu_checks_pool_len():
    kernel = _module("sgl_kernel")
    with pytest.raises(ValueError, match="req_to_token"):
        kernel.assign_req_to_token_pool_cpu(torch.tensor([0]), torch.zeros((2, 4), dtype=torch.int32),
                                            torch.tensor([0]), torch.tensor([1]), torch.tensor([7]), 8)


@pytest.mark.parametrize("op", sorted(standins._NOT_IMPLEMENTED_OPS))
def test_unimplemented_ops_raise_naming_themselves(op):
    kernel = _module("sgl_kernel")
    with pytest.raises(NotImplementedError, match=op):
        getattr(kernel, op)(torch.zeros(1))


def test_torchvision_names_and_enums():
    transforms = _module("torchvision.transforms")
    assert [m.value for m in transforms.InterpolationMode] == [
        "nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]
    io = _module("torchvision.io")
    assert io.ImageReadMode.RGB.value == 3 and io.ImageReadMode.UNCHANGED.value == 0
    with pytest.raises(NotImplementedError, match="decode_jpeg"):
        io.decode_jpeg(b"")


def test_finder_only_serves_its_names():
    finder = standins.StandinFinder()
    assert finder.find_spec("numpy") is None
    assert finder.find_spec("torchvision.models") is None
    assert finder.find_spec("torchvision.transforms").submodule_search_locations is not None


def _without_standin_finder(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not getattr(f, standins.STANDIN_MARKER, 0)])


def test_install_is_idempotent_and_puts_the_finder_last(monkeypatch):
    _without_standin_finder(monkeypatch)
    monkeypatch.delitem(sys.modules, "transformers", raising=False)
    assert standins.install() is True
    assert standins.install() is False
    markers = [bool(getattr(f, standins.STANDIN_MARKER, False)) for f in sys.meta_path]
    assert markers.count(True) == 1 and markers[-1]  # last: any real package is found before a stand-in


def test_install_refuses_once_transformers_decided_torchvision_is_missing(monkeypatch):
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        pytest.skip("a torchvision is importable here")
    _without_standin_finder(monkeypatch)
    monkeypatch.setitem(sys.modules, "transformers", type(sys)("transformers"))
    with pytest.raises(RuntimeError, match="before transformers is imported"):
        standins.install()
