"""Policy registry: built-ins through entry points, the allowlist for third-party plugins, duplicates.

The example plugin (examples/kvpolicy-example-plugin) is really installed with pip into a temporary
directory, so discovery goes through the same importlib.metadata path as any installed distribution.
"""

from __future__ import annotations

import importlib
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvpolicy
from kvpolicy import registry
from kvpolicy.policy import EvictionPolicy, LayerInputs

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SRC = ROOT / "examples" / "kvpolicy-example-plugin"
BUILTINS = ["knorm", "kvzap_linear", "kvzap_mlp", "kvzip_plus", "random", "snapkv", "streaming_llm", "window"]


@pytest.fixture()
def fresh_registry(monkeypatch):
    """Rescan before and after, so registrations made by a test do not leak."""
    monkeypatch.delenv(registry.ALLOWLIST_ENV, raising=False)
    kvpolicy.reload_plugins()
    yield
    kvpolicy.reload_plugins()


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    target = tmp_path_factory.mktemp("plugin-site")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = shutil.copytree(PLUGIN_SRC, tmp_path_factory.mktemp("plugin-src") / "src")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
           "--disable-pip-version-check", "--target", str(target), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"pip could not install the example plugin:\n{done.stdout}\n{done.stderr}")
    return target


@pytest.fixture()
def plugin_on_path(plugin_dir, fresh_registry):
    sys.path.insert(0, str(plugin_dir))
    importlib.invalidate_caches()
    kvpolicy.reload_plugins()
    try:
        yield plugin_dir
    finally:
        sys.path.remove(str(plugin_dir))
        sys.modules.pop("kvpolicy_example_plugin", None)
        importlib.invalidate_caches()
        kvpolicy.reload_plugins()


def test_plugin_needs_the_allowlist(plugin_on_path, monkeypatch):
    assert "value_norm" not in kvpolicy.available_policies()
    with pytest.raises(kvpolicy.UnknownPolicyError) as err:
        kvpolicy.get_policy_class("value_norm")
    assert "KVPOLICY_PLUGINS=value_norm" in str(err.value)
    assert [s.name for s in registry.skipped_plugins()] == ["value_norm"]
    assert "kvpolicy_example_plugin" not in sys.modules  # not even imported

    monkeypatch.setenv(registry.ALLOWLIST_ENV, "value_norm")
    kvpolicy.reload_plugins()
    assert "value_norm" in kvpolicy.available_policies()
    policy = kvpolicy.get_policy("value_norm", ratio=0.25)
    assert policy.config.ratio == 0.25 and policy.name == "value_norm"
    values = torch.tensor([[[[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]]]])  # norms 5, 1, 0
    inputs = LayerInputs(layer_idx=0, keys=torch.zeros_like(values), values=values, positions=torch.arange(3))
    scores = policy.score(inputs)
    assert scores.shape == (1, 1, 3) and scores.dtype == torch.float32
    torch.testing.assert_close(scores[0, 0, :2], torch.tensor([math.log(5.0), 0.0]))
    assert torch.isfinite(scores).all()
    assert "kvpolicy-example-plugin" in registry._get_registry().origin("value_norm")


def test_wildcard_allowlist(plugin_on_path, monkeypatch):
    monkeypatch.setenv(registry.ALLOWLIST_ENV, "*")
    kvpolicy.reload_plugins()
    assert set(kvpolicy.available_policies()) == {*BUILTINS, "value_norm"}


def test_other_names_in_allowlist_do_not_load_it(plugin_on_path, monkeypatch):
    monkeypatch.setenv(registry.ALLOWLIST_ENV, "something_else, knorm")
    kvpolicy.reload_plugins()
    assert "value_norm" not in kvpolicy.available_policies()


def test_all_builtins_listed_and_load(fresh_registry):
    assert kvpolicy.available_policies() == BUILTINS
    for name in BUILTINS:
        cls = kvpolicy.get_policy_class(name)
        assert issubclass(cls, EvictionPolicy)
        assert cls.__module__ == f"kvpolicy.policies.{name}"  # file name = registry name
        assert registry._get_registry().origin(name).startswith("kvpolicy ")


def test_unknown_name_lists_known_ones(fresh_registry):
    with pytest.raises(kvpolicy.UnknownPolicyError) as err:
        kvpolicy.get_policy("kvzapp")
    message = str(err.value)
    assert "'kvzapp'" in message and all(name in message for name in BUILTINS)


def test_duplicate_names_fail(fresh_registry):
    class Mine(EvictionPolicy):
        def score(self, inputs):
            return torch.zeros(inputs.keys.shape[:3])

    with pytest.raises(ValueError, match="duplicate policy name 'window'"):
        kvpolicy.register_policy("window", Mine)
    kvpolicy.register_policy("mine", Mine)
    assert kvpolicy.get_policy_class("mine") is Mine
    with pytest.raises(ValueError, match="duplicate policy name 'mine'"):
        kvpolicy.register_policy("mine", Mine)
    with pytest.raises(TypeError):
        kvpolicy.register_policy("not_a_policy", int)


def test_loading_is_idempotent(fresh_registry):
    first = registry._get_registry()
    assert registry._get_registry() is first
    assert kvpolicy.available_policies() == kvpolicy.available_policies()
    assert kvpolicy.get_policy_class("knorm") is kvpolicy.get_policy_class("knorm")
    kvpolicy.reload_plugins()
    assert kvpolicy.get_policy_class("knorm") is kvpolicy.get_policy_class("knorm")
