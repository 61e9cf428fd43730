"""--kv-policy flags, the launcher's refusals, the plugin hook and the version check."""

from __future__ import annotations

import json

import pytest
import torch

from kvpolicy import EvictionPolicy, OraclePolicy, register_policy
from kvpolicy.adapters.sglang.config import AdapterConfigError, SGLangPolicyConfig, TokenVote, parse_policy_flags
from kvpolicy.policy import HIDDEN_STATES
from kvpolicy.registry import available_policies


class _KeysNormPolicy(EvictionPolicy):
    """Scores from the keys only: no forward hooks needed."""

    supports_decoding = True

    def score(self, inputs):
        return inputs.keys.float().norm(dim=-1)


class _HiddenStatePolicy(EvictionPolicy):
    """Needs the attention-layer input hidden states (a forward pre-hook), like KVzap."""

    captures = frozenset({HIDDEN_STATES})
    supports_decoding = True

    def score(self, inputs):
        return inputs.hidden_states.float().mean(-1)[:, None, :]


class _OracleTestPolicy(OraclePolicy):
    def compute_scores(self, runner, context_ids):
        return {}


TEST_POLICIES = {"sglang_test_keys": _KeysNormPolicy, "sglang_test_hidden": _HiddenStatePolicy,
                 "sglang_test_oracle": _OracleTestPolicy}


@pytest.fixture(autouse=True, scope="module")
def _registered():
    for name, cls in TEST_POLICIES.items():
        if name not in available_policies():
            register_policy(name, cls)


def test_valid_flags_parse():
    config = parse_policy_flags("sglang_test_keys", '{"threshold": -2.5, "window": 16}')
    assert config == SGLangPolicyConfig(policy="sglang_test_keys", policy_config={"threshold": -2.5, "window": 16})
    policy = config.build_policy()
    assert policy.config.window == 16 and policy.config.threshold == -2.5
    assert parse_policy_flags(None, None) is None


@pytest.mark.parametrize(
    "policy, config_json, message",
    [
        ("no_such_policy", None, "unknown policy 'no_such_policy'"),
        ("sglang_test_keys", "{not json", "not valid JSON"),
        ("sglang_test_keys", "[1, 2]", "must be a JSON object"),
        ("sglang_test_keys", '{"treshold": 1}', "invalid --kv-policy-config"),
        ("sglang_test_keys", '{"ratio": 0.5}', "threshold selection only"),
        ("sglang_test_oracle", None, "is an oracle"),
        (None, '{"threshold": 1}', "without --kv-policy"),
    ],
    ids=["unknown", "bad-json", "not-object", "unknown-field", "ratio", "oracle", "config-without-policy"],
)
def test_invalid_flags_refused_with_clear_message(policy, config_json, message):
    with pytest.raises(AdapterConfigError, match=message):
        parse_policy_flags(policy, config_json)


def test_token_vote_fields():
    assert parse_policy_flags("sglang_test_keys", None, token_vote="fraction",
                              min_keep_fraction=0.25).token_vote is TokenVote.FRACTION
    with pytest.raises(AdapterConfigError, match="min_keep_fraction"):
        parse_policy_flags("sglang_test_keys", None, min_keep_fraction=0.25)
    with pytest.raises(AdapterConfigError, match="token_vote"):
        parse_policy_flags("sglang_test_keys", None, token_vote="median")


def test_launcher_builds_sglang_arguments_and_env():
    from kvpolicy.adapters.sglang.launch import build_launch
    from kvpolicy.adapters.sglang.plugin import LIVE_ENV

    plan = build_launch(["--model-path", "m", "--kv-policy", "sglang_test_keys",
                         "--kv-policy-config", '{"threshold": -3}', "--port", "30000"])
    assert plan.sglang_argv == ["--model-path", "m", "--port", "30000", "--radix-cache-backend", "kvpolicy",
                                "--disable-overlap-schedule"]
    assert any("--disable-overlap-schedule" in note for note in plan.notes)  # said on stderr by main()
    assert json.loads(plan.env["KVPOLICY_SGLANG_CONFIG"])["policy_config"] == {"threshold": -3}
    assert plan.env[LIVE_ENV] == "1"  # live pruning is the default
    assert plan.config.policy == "sglang_test_keys"
    # what the scheduler process reads back is the same config (defaults included)
    from kvpolicy.adapters.sglang.plugin import config_from_env

    assert config_from_env(plan.env) == plan.config
    plan = build_launch(["--kv-policy", "sglang_test_keys", "--kv-token-vote", "fraction",
                         "--kv-min-keep-fraction", "0.25", "--disable-overlap-schedule"])
    assert config_from_env(plan.env).min_keep_fraction == 0.25
    assert plan.sglang_argv.count("--disable-overlap-schedule") == 1 and plan.notes == ()
    # the old opt-in flag is still accepted and not passed on to SGLang
    plan = build_launch(["--kv-policy", "sglang_test_keys", "--kv-experimental-live"])
    assert "--kv-experimental-live" not in plan.sglang_argv


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--radix-cache-backend", "lmcache"], "needs --radix-cache-backend kvpolicy"),
        (["--disable-radix-cache"], "drop --disable-radix-cache"),
        (["--page-size", "16"], "--page-size 1"),
        (["--speculative-algorithm", "EAGLE"], "speculative"),
        (["--tp-size", "2"], "single GPU/CPU worker"),
        (["--enable-hierarchical-cache"], "hierarchical"),
        (["--enable-mixed-chunk"], "mixed-chunk"),
    ],
    ids=["other-backend", "no-radix", "page-size", "speculative", "tp", "hicache", "mixed-chunk"],
)
def test_launcher_refuses_unsupported_combinations(extra, message):
    from kvpolicy.adapters.sglang.launch import build_launch

    with pytest.raises(AdapterConfigError, match=message):
        build_launch(["--model-path", "m", "--kv-policy", "sglang_test_keys", *extra])


def test_launcher_disables_cuda_graphs_for_hidden_state_hooks():
    from kvpolicy.adapters.sglang.launch import build_launch

    plan = build_launch(["--model-path", "m", "--kv-policy", "sglang_test_hidden"])
    assert "--disable-cuda-graph" in plan.sglang_argv and any("CUDA graph" in n for n in plan.notes)
    plan = build_launch(["--model-path", "m", "--kv-policy", "sglang_test_hidden", "--disable-cuda-graph"])
    assert plan.sglang_argv.count("--disable-cuda-graph") == 1
    on_cpu = build_launch(["--kv-policy", "sglang_test_hidden", "--device", "cpu"])
    assert "--disable-cuda-graph" not in on_cpu.sglang_argv  # no CUDA graphs on CPU
    assert "--disable-cuda-graph" not in build_launch(["--kv-policy", "sglang_test_keys"]).sglang_argv  # no hooks


def test_launcher_refuses_query_capturing_policies():
    from kvpolicy.adapters.sglang.launch import build_launch
    from kvpolicy.registry import get_policy_class

    try:
        get_policy_class("snapkv")
    except Exception as exc:
        pytest.skip(f"snapkv not loadable here: {exc}")
    with pytest.raises(AdapterConfigError, match="needs queries, which the SGLang adapter cannot capture"):
        build_launch(["--model-path", "m", "--kv-policy", "snapkv", "--kv-policy-config", '{"threshold": 0}'])


def test_launcher_main_refuses_with_exit_status_2(capsys):
    from kvpolicy.adapters.sglang.launch import EXIT_REFUSED, main

    assert main(["--model-path", "m", "--kv-policy", "sglang_test_oracle"]) == EXIT_REFUSED
    assert "kvpolicy: refused:" in capsys.readouterr().err


def test_kvzap_surrogate_is_checked_against_a_local_model(tmp_path):
    from kvpolicy.adapters.sglang.launch import build_launch

    surrogate = _save_tiny_surrogate(tmp_path / "kvzap")
    model = _write_model_config(tmp_path / "model", hidden_size=64, num_key_value_heads=2, num_hidden_layers=2)
    flags = ["--kv-policy", "kvzap_mlp", "--kv-policy-config", json.dumps({"surrogate": str(surrogate),
                                                                          "threshold": -4})]
    plan = build_launch(["--model-path", str(model), *flags])
    assert plan.config.policy == "kvzap_mlp"
    other = _write_model_config(tmp_path / "other", hidden_size=96, num_key_value_heads=2, num_hidden_layers=2)
    with pytest.raises(AdapterConfigError, match="input_dim=64 but the model's hidden_size=96"):
        build_launch(["--model-path", str(other), *flags])
    build_launch(["--model-path", "Qwen/Qwen3-8B", *flags])  # not a local directory: checked by the scheduler


def _save_tiny_surrogate(path):
    from kvpolicy.surrogate import KVzapSurrogate, SurrogateConfig, save_surrogate

    torch.manual_seed(0)
    return save_surrogate(KVzapSurrogate(SurrogateConfig(model_type="kvzap", input_dim=64, output_dim=2,
                                                         n_modules=2, hidden_dim=8)), path)


def _write_model_config(path, **fields):
    path.mkdir(parents=True)
    config = {"model_type": "qwen3", "num_attention_heads": 4, "head_dim": 16, **fields}
    (path / "config.json").write_text(json.dumps(config))
    return path


# The launcher as users run it: refusals exit with status 2 and say why, before SGLang is imported.
def _launch(*args, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "kvpolicy.adapters.sglang.launch", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_launcher_command_line_refusals(tmp_path):
    from kvpolicy.registry import available_policies

    if not {"kvzap_mlp", "kvzip_plus", "window"} <= set(available_policies()):
        pytest.skip("the built-in policies are not registered in this environment")
    surrogate = _save_tiny_surrogate(tmp_path / "kvzap")
    model = _write_model_config(tmp_path / "model", hidden_size=32, num_key_value_heads=2, num_hidden_layers=2)
    cases = {
        "unknown policy 'nope'": ["--kv-policy", "nope"],
        "threshold must not be NaN": ["--kv-policy", "window", "--kv-policy-config", '{"threshold": NaN}'],
        "input_dim=64 but the model's hidden_size=32": [
            "--model-path", str(model), "--kv-policy", "kvzap_mlp", "--kv-policy-config",
            json.dumps({"surrogate": str(surrogate), "threshold": -4})],
        "'kvzip_plus' is an oracle": ["--kv-policy", "kvzip_plus"],
    }
    for message, args in cases.items():
        proc = _launch(*args)
        assert proc.returncode == 2 and "kvpolicy: refused:" in proc.stderr and message in proc.stderr, \
            (args, proc.stderr[-2000:])
        assert "sglang" not in proc.stdout.lower()


def test_config_env_round_trip():
    from kvpolicy.adapters.sglang.plugin import CONFIG_ENV, config_from_env

    config = SGLangPolicyConfig(policy="sglang_test_keys", policy_config={"threshold": 1.0},
                                token_vote="fraction", min_keep_fraction=0.75)
    env = {CONFIG_ENV: json.dumps(config.model_dump(mode="json"))}
    assert config_from_env(env) == config
    with pytest.raises(AdapterConfigError, match=CONFIG_ENV):
        config_from_env({})
    with pytest.raises(AdapterConfigError, match="not a valid"):
        config_from_env({CONFIG_ENV: "{"})


def test_vote_tokens():
    from kvpolicy.adapters.sglang.token_vote import vote_tokens
    from kvpolicy.selection import Decision

    # 2 layers x 2 heads, 1 sequence, 3 tokens: token 0 kept by 1/4 entries, token 1 by 3/4, token 2 by none
    layer0 = torch.tensor([[[True, True, False], [False, True, False]]])
    layer1 = torch.tensor([[[False, True, False], [False, False, False]]])
    decisions = [Decision(0, 3, layer0), Decision(1, 3, layer1)]
    assert vote_tokens(decisions).tolist() == [[True, True, False]]
    assert vote_tokens(decisions, TokenVote.FRACTION, 0.5).tolist() == [[False, True, False]]
    assert vote_tokens(decisions, TokenVote.FRACTION, 0.25).tolist() == [[True, True, False]]
    with pytest.raises(ValueError, match="different numbers"):
        vote_tokens([Decision(0, 3, layer0), Decision(1, 2, layer1[:, :, :2])])


# -- needs SGLang ------------------------------------------------------------------------------------


def test_plugin_registers_backend_and_factory_builds_the_cache(monkeypatch):
    from tests.adapters.sglang.conftest import Harness, sglang_or_skip

    sglang_or_skip()
    from kvpolicy.adapters.sglang import plugin
    from kvpolicy.adapters.sglang._internals import TreeCacheBuildContext, get_radix_cache_factory
    from kvpolicy.adapters.sglang.cache import KVPolicyRadixCache

    plugin.register()
    plugin.register()  # idempotent: SGLang may call load_plugins() in several places
    assert get_radix_cache_factory("kvpolicy") is plugin.radix_cache_factory

    h = Harness(window=4)
    monkeypatch.setenv(plugin.CONFIG_ENV, json.dumps(
        {"policy": "sglang_test_keys", "policy_config": {"threshold": 0.0, "window": 24}}))

    def context(**overrides):
        fields = dict(server_args=None, params=h.cache_params, is_hybrid_swa=False, is_hybrid_ssm=False,
                      enable_hierarchical_cache=False, disable_radix_cache=False,
                      effective_chunked_prefill_size=None, tp_worker=None, model_config=None, tp_size=1,
                      tp_rank=0, tp_group=None)
        fields.update(overrides)
        return TreeCacheBuildContext(**fields)

    cache = plugin.radix_cache_factory(context())
    assert isinstance(cache, KVPolicyRadixCache) and cache.window == 24
    with pytest.raises(AdapterConfigError, match="hybrid sliding-window"):
        plugin.radix_cache_factory(context(is_hybrid_swa=True))
    with pytest.raises(AdapterConfigError, match="disable-radix-cache"):
        plugin.radix_cache_factory(context(disable_radix_cache=True))


def test_sglang_plugin_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "kvpolicy"]
    if not eps:
        pytest.skip("kvpolicy is not installed with its entry points in this environment")
    assert eps[0].value == "kvpolicy.adapters.sglang.plugin:register"


def test_version_check_refuses_unchecked_versions():
    from tests.adapters.sglang.conftest import sglang_or_skip

    sglang_or_skip()
    from kvpolicy.adapters.sglang._internals import UnsupportedSGLangVersion, check_sglang_version

    assert check_sglang_version("0.5.19") == "0.5.19"
    with pytest.raises(UnsupportedSGLangVersion, match=r"sglang 0\.5\.23 is not supported"):
        check_sglang_version("0.5.23")


def test_page_size_and_eagle_refused_by_the_cache():
    from tests.adapters.sglang.conftest import Harness, sglang_or_skip

    sglang_or_skip()
    from dataclasses import replace

    from kvpolicy.adapters.sglang.cache import KVPolicyRadixCache

    h = Harness(window=4)
    with pytest.raises(ValueError, match="page_size=1"):
        KVPolicyRadixCache(replace(h.cache_params, page_size=16), window=4)
    with pytest.raises(ValueError, match="speculative"):
        KVPolicyRadixCache(replace(h.cache_params, is_eagle=True), window=4)


def test_builtin_oracle_kvzip_plus_is_refused():
    from kvpolicy.registry import get_policy_class

    try:
        get_policy_class("kvzip_plus")
    except Exception as exc:  # the built-in policy module may not be importable in this checkout
        pytest.skip(f"kvzip_plus not loadable here: {exc}")
    with pytest.raises(AdapterConfigError, match="is an oracle"):
        parse_policy_flags("kvzip_plus", None)


def test_builtin_window_policy_is_accepted_for_live_serving():
    from kvpolicy.adapters.sglang.launch import build_launch
    from kvpolicy.registry import get_policy_class

    try:
        get_policy_class("window")
    except Exception as exc:
        pytest.skip(f"window not loadable here: {exc}")
    plan = build_launch(["--kv-policy", "window", "--kv-policy-config", '{"window": 8}'])
    assert plan.config.build_policy().config.window == 8 and plan.env["KVPOLICY_SGLANG_LIVE"] == "1"


def test_factory_checks_the_policy_against_the_loaded_model(monkeypatch, tmp_path):
    """In the scheduler process: surrogate vs the model SGLang loaded, and live-mode capture refusals."""
    from types import SimpleNamespace

    from tests.adapters.sglang.conftest import Harness, sglang_or_skip

    sglang_or_skip()
    from kvpolicy.adapters.sglang import plugin
    from kvpolicy.adapters.sglang._internals import TreeCacheBuildContext
    from kvpolicy.registry import available_policies

    if "kvzap_mlp" not in available_policies():
        pytest.skip("kvzap_mlp is not registered in this environment")
    h = Harness(window=4)

    def context(hidden_size):
        hf_config = SimpleNamespace(to_dict=lambda: {"hidden_size": hidden_size, "num_attention_heads": 4,
                                                     "num_key_value_heads": 2, "num_hidden_layers": 2})
        return TreeCacheBuildContext(server_args=None, params=h.cache_params, is_hybrid_swa=False,
                                     is_hybrid_ssm=False, enable_hierarchical_cache=False, disable_radix_cache=False,
                                     effective_chunked_prefill_size=None, tp_worker=None,
                                     model_config=SimpleNamespace(hf_config=hf_config), tp_size=1, tp_rank=0,
                                     tp_group=None)

    surrogate = _save_tiny_surrogate(tmp_path / "kvzap")
    monkeypatch.setenv(plugin.CONFIG_ENV, json.dumps({"policy": "kvzap_mlp", "policy_config": {
        "surrogate": str(surrogate), "threshold": -4.0, "window": 4}}))
    assert plugin.radix_cache_factory(context(64)).window == 4  # not live: no hooks needed
    with pytest.raises(AdapterConfigError, match="hidden_size=32"):
        plugin.radix_cache_factory(context(32))
    monkeypatch.setenv(plugin.LIVE_ENV, "1")
    with pytest.raises(AdapterConfigError, match="needs the model object"):  # no worker to hook
        plugin.radix_cache_factory(context(64))
    monkeypatch.setenv(plugin.CONFIG_ENV, json.dumps({"policy": "snapkv", "policy_config": {"threshold": 0.0}}))
    if "snapkv" in available_policies():
        with pytest.raises(AdapterConfigError, match="cannot capture"):
            plugin.radix_cache_factory(context(64))


@pytest.mark.parametrize("threshold", [float("-inf"), float("inf")])
def test_infinite_threshold_survives_the_launch_handoff(threshold):
    """The scheduler rebuilds the policy from the launcher's JSON: +-inf must not become null (= the default)."""
    from kvpolicy.adapters.sglang.launch import build_launch
    from kvpolicy.adapters.sglang.plugin import CONFIG_ENV, config_from_env

    plan = build_launch(["--kv-policy", "window", "--kv-policy-config",
                         json.dumps({"threshold": threshold, "window": 8}), "--device", "cpu"])
    config = config_from_env({CONFIG_ENV: plan.env[CONFIG_ENV]})
    assert config.build_policy().config.threshold == threshold


def test_sglang_own_launcher_and_kvpolicy_serve_refuse_with_exit_status_2():
    """``python -m sglang.launch_server --kv-policy ...`` (the plugin's hook on prepare_server_args) and
    ``kvpolicy serve`` refuse bad policies before anything starts, like the kvpolicy launcher."""
    import os
    import subprocess
    import sys

    from pathlib import Path

    from tests.adapters.sglang.conftest import sglang_or_skip

    sglang_or_skip()
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}
    commands = {
        "unknown policy 'nope'": [sys.executable, "-m", "sglang.launch_server", "--model-path", "m",
                                  "--kv-policy", "nope"],
        "'kvzip_plus' is an oracle": [sys.executable, "-m", "sglang.launch_server", "--model-path", "m",
                                      "--kv-policy", "kvzip_plus"],
        "threshold must not be NaN": [sys.executable, "-m", "kvpolicy", "serve", "--model-path", "m",
                                      "--kv-policy", "window", "--kv-policy-config", '{"threshold": NaN}'],
    }
    sglang_cli = Path(sys.executable).parent / "sglang"  # SGLang's console script: `sglang serve ...`
    if sglang_cli.exists():
        from kvpolicy.testbed import MODEL_DIR  # `sglang serve` inspects the model path before parsing

        commands["Input should be greater than or equal to 0"] = [
            str(sglang_cli), "serve", "--model-path", str(MODEL_DIR), "--kv-policy", "window",
            "--kv-policy-config", '{"window": -1}']
    for message, cmd in commands.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
        assert proc.returncode == 2 and "kvpolicy: refused:" in proc.stderr and message in proc.stderr, \
            (cmd, proc.returncode, proc.stderr[-3000:])
