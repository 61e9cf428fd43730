"""Supported library versions: the package metadata, the version check, and the API differences in one place."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
import torch
import transformers
from packaging.requirements import Requirement

import kvpolicy
from kvpolicy.adapters.hf import PolicyLayer, _compat
from kvpolicy.adapters.hf._compat import MIN_VERSIONS, UnsupportedVersionError, check_versions, crop_to

from .conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {req.name: req for req in map(Requirement, project["dependencies"])}


@pytest.mark.parametrize("package, version", [
    ("torch", "2.13.0"), ("torch", "2.14.1"),                 # the CPU build here; SGLang 0.5.23's pin
    ("transformers", "5.0.0"), ("transformers", "5.19.0"), ("transformers", "5.23.0"),
])
def test_metadata_admits_the_versions_users_run(package, version):
    assert _requirements()[package].specifier.contains(version), (package, version)


def test_metadata_lower_bounds_match_the_version_check():
    reqs = _requirements()
    for package, minimum in MIN_VERSIONS.items():
        spec = reqs[package].specifier
        assert not spec.contains(_below(minimum)), f"{package} metadata admits a version below {minimum}"
        assert spec.contains(minimum)
        assert all(s.operator == ">=" for s in spec), f"{package} has an upper cap: {spec}"


def _below(version: str) -> str:
    major, minor = version.split(".")[:2]
    return f"{major}.{int(minor) - 1}.99" if int(minor) > 0 else f"{int(major) - 1}.99.0"


def test_installed_versions_pass():
    found = check_versions()
    assert found == {"transformers": transformers.__version__, "torch": torch.__version__}


@pytest.mark.parametrize("package, old", [("transformers", "4.57.6"), ("torch", "2.5.1+cu124")])
def test_old_versions_are_refused_with_the_range(package, old):
    installed = {"transformers": "5.23.0", "torch": "2.13.0", package: old}
    with pytest.raises(UnsupportedVersionError) as err:
        check_versions(installed)
    message = str(err.value)
    assert f"{package} {old} is not supported" in message
    assert f">= {MIN_VERSIONS[package]}" in message


def test_missing_library_is_named():
    with pytest.raises(UnsupportedVersionError, match="transformers is not installed"):
        check_versions({"transformers": None, "torch": "2.13.0"})


def test_prereleases_and_local_builds_of_the_minimum_pass():
    check_versions({"transformers": "5.0.0rc1", "torch": "2.6.0+cpu"})


def test_apply_refuses_an_old_library_before_touching_the_model(monkeypatch):
    model = tiny_model("qwen3")
    before = model.config._attn_implementation
    monkeypatch.setattr(_compat, "_installed", lambda p: "4.57.6" if p == "transformers" else torch.__version__)
    with pytest.raises(UnsupportedVersionError, match="transformers 4.57.6"):
        kvpolicy.apply(model, "window", window=4)
    assert model.config._attn_implementation == before
    assert not model._forward_pre_hooks


def test_import_with_an_old_library_fails_with_the_version_message():
    # A fresh interpreter in which the metadata reports transformers 4.57.6: `kvpolicy.apply` must raise the
    # version error from the adapter's import, not an ImportError or TypeError from inside transformers.
    script = textwrap.dedent("""
        import importlib.metadata as md
        real = md.version
        md.version = lambda name: "4.57.6" if name == "transformers" else real(name)
        import kvpolicy
        try:
            kvpolicy.apply(object(), "window")
        except Exception as exc:
            print(type(exc).__name__, exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    expected = "UnsupportedVersionError transformers 4.57.6 is not supported"
    assert out.stdout.startswith(expected), out.stdout + out.stderr


def test_cache_layer_defines_the_max_length_under_both_names():
    layer = PolicyLayer("ragged")  # abstract-method errors (transformers >= 5.13) would raise here
    assert layer.get_max_length() == -1
    assert layer.get_max_cache_shape() == -1


def test_crop_to_cuts_a_dynamic_cache_back():
    model = tiny_model("qwen3")
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.arange(1, 11)[None], past_key_values=cache, use_cache=True)
    keys = cache.layers[0].keys.clone()
    crop_to(cache, 10)  # nothing to remove: a no-op (crop(0) would empty the cache before transformers 5.13)
    assert cache.get_seq_length() == 10
    crop_to(cache, 6)
    assert cache.get_seq_length() == 6
    assert torch.equal(cache.layers[0].keys, keys[:, :, :6])
    with pytest.raises(ValueError, match="cannot crop a cache of 6 tokens to 8"):
        crop_to(cache, 8)
