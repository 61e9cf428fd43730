"""Policy registry: built-ins through entry points, the allowlist for third-party plugins, duplicates.

The example plugin (examples/kvpolicy-example-plugin) is really installed with pip into a temporary
directory, so discovery goes through the same importlib.metadata path as any installed distribution.
"""

from __future__ import annotations

import importlib
import math
import re
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
    with pytest.warns(registry.PluginWarning, match="no installed package provides a policy plugin named "
                                                    "'something_else' \\(installed plugins: value_norm\\)"):
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


# -- distributions other than kvpolicy that declare built-in names, fail to load, or are allowlisted badly --------


@pytest.fixture()
def fake_dists(tmp_path, fresh_registry):
    """``add(dist, {name: "module:attr"})`` puts an installed-looking distribution (a ``.dist-info`` with
    ``entry_points.txt``, found by importlib.metadata like any other) first on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    sys.path.insert(0, str(site))

    def add(dist: str, entry_points: dict[str, str]) -> None:
        info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines = [f"{name} = {target}" for name, target in entry_points.items()]
        (info / "entry_points.txt").write_text("[kvpolicy.policies]\n" + "\n".join(lines) + "\n")
        importlib.invalidate_caches()
        kvpolicy.reload_plugins()

    try:
        yield add
    finally:
        sys.path.remove(str(site))
        importlib.invalidate_caches()
        kvpolicy.reload_plugins()


def _list_output(capsys) -> str:
    from kvpolicy.lab.cli import main

    assert main(["list"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("target", ["kvpolicy.policies.window:WindowPolicy", "kvpolicy.policies.knorm:KNormPolicy"],
                         ids=["same-target", "other-target"])
def test_a_package_that_is_not_allowlisted_cannot_hide_a_builtin(fake_dists, capsys, target):
    fake_dists("shadow-pkg", {"window": target})
    assert kvpolicy.available_policies() == BUILTINS
    assert kvpolicy.get_policy_class("window").__module__ == "kvpolicy.policies.window"
    assert registry._get_registry().origin("window").startswith("kvpolicy ")
    [skipped] = registry.skipped_plugins()
    assert (skipped.name, skipped.distribution) == ("window", "shadow-pkg")
    assert "not in KVPOLICY_PLUGINS" in skipped.reason and "could not replace" in skipped.reason
    listing = _list_output(capsys)
    assert listing.startswith("knorm ") and "\nwindow           decoding" in listing


@pytest.mark.parametrize("allow", ["window", "*"])
@pytest.mark.parametrize("target", ["kvpolicy.policies.window:WindowPolicy", "kvpolicy.policies.knorm:KNormPolicy"],
                         ids=["same-target", "other-target"])
def test_an_allowlisted_plugin_declaring_a_builtin_name_is_refused(fake_dists, monkeypatch, target, allow):
    monkeypatch.setenv(registry.ALLOWLIST_ENV, allow)
    fake_dists("shadow-pkg", {"window": target})
    with pytest.warns(registry.PluginWarning, match="'window' is a built-in policy, and a plugin cannot replace it"):
        names = kvpolicy.available_policies()
    assert names == BUILTINS
    assert kvpolicy.get_policy_class("window").__module__ == "kvpolicy.policies.window"
    assert registry._get_registry().origin("window").startswith("kvpolicy ")
    [skipped] = registry.skipped_plugins()
    assert skipped.distribution == "shadow-pkg" and skipped.reason.startswith("refused:")


def test_none_is_reserved_for_no_policy(fake_dists, monkeypatch):
    class Mine(EvictionPolicy):
        def score(self, inputs):
            return torch.zeros(inputs.keys.shape[:3])

    with pytest.raises(ValueError, match="'none' is reserved"):
        kvpolicy.register_policy("none", Mine)
    monkeypatch.setenv(registry.ALLOWLIST_ENV, "none")
    fake_dists("none-pkg", {"none": "kvpolicy.policies.window:WindowPolicy"})
    with pytest.warns(registry.PluginWarning, match="'none' means no policy"):
        assert "none" not in kvpolicy.available_policies()


def test_list_shows_every_policy_and_why_a_plugin_did_not_load(fake_dists, monkeypatch, capsys):
    monkeypatch.setenv(registry.ALLOWLIST_ENV, "aaa_broken,not_a_policy")
    fake_dists("broken-pkg", {"aaa_broken": "kvpolicy_no_such_module_anywhere:Policy",
                              "not_a_policy": "json:loads"})
    listing = _list_output(capsys)
    lines = listing.splitlines()
    assert lines[0].startswith("aaa_broken       (failed to load: policy plugin 'aaa_broken' (broken-pkg: "
                               "kvpolicy_no_such_module_anywhere:Policy) failed to load: No module named")
    assert "not_a_policy     (failed to load: policy plugin 'not_a_policy' (broken-pkg: json:loads) is not an " \
           "EvictionPolicy subclass)" in lines
    for name in BUILTINS:  # everything after the broken plugin is still listed
        assert any(line.startswith(f"{name} ") and "failed" not in line for line in lines), name
    with pytest.raises(ImportError, match="kvpolicy_no_such_module_anywhere"):
        kvpolicy.get_policy_class("aaa_broken")  # using it still fails loudly


@pytest.mark.parametrize(
    "value, message",
    [
        ("*,value_norm", "'*' allows every plugin only on its own"),
        ("value_norm;knorm", "'value_norm;knorm' is not a policy name"),
        ("value_norm knorm", "'value_norm knorm' is not a policy name"),
        ("valeu_norm", "no installed package provides a policy plugin named 'valeu_norm'"),
    ],
    ids=["star-with-names", "semicolon", "space", "typo"],
)
def test_a_malformed_allowlist_warns_and_fails_closed(plugin_on_path, monkeypatch, capsys, value, message):
    monkeypatch.setenv(registry.ALLOWLIST_ENV, value)
    kvpolicy.reload_plugins()
    with pytest.warns(registry.PluginWarning, match=re.escape(message)):
        names = kvpolicy.available_policies()
    loaded = "value_norm" in names
    assert loaded == (value == "*,value_norm")  # the names it did understand still count; '*' does not
    assert [p for p in registry.allowlist_problems() if message in p]
    kvpolicy.reload_plugins()
    listing = _list_output(capsys)
    assert "warning: KVPOLICY_PLUGINS was not understood in full:" in listing and message in listing


@pytest.mark.parametrize("value", ["", "*", " value_norm , ", "value_norm,knorm"])
def test_a_well_formed_allowlist_does_not_warn(plugin_on_path, monkeypatch, value):
    import warnings

    monkeypatch.setenv(registry.ALLOWLIST_ENV, value)
    kvpolicy.reload_plugins()
    with warnings.catch_warnings():
        warnings.simplefilter("error", registry.PluginWarning)
        kvpolicy.available_policies()
    assert registry.allowlist_problems() == []
