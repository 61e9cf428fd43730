"""The ``--kv-*`` flags, the launcher's refusals on SGLang's own parse, the plugin, the version gate and the
token vote of the head-row adapter (SGLang 0.5.23).

The config and flag tests need no SGLang and run in the main venv too; everything that parses with SGLang or
registers into it calls :func:`sglang_or_skip` first. SGLang's registries are process-global, so the tests that
touch them run on a private copy (:func:`sglang_registries`) and do not depend on their order.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from kvpolicy.adapters.sglang import launch
from kvpolicy.adapters.sglang._internals import (
    SUPPORTED_SGLANG_VERSIONS,
    UnsupportedSGLangVersion,
    check_sglang_version,
)
from kvpolicy.adapters.sglang.config import (
    ATTENTION_BACKEND,
    ATTENTION_BACKENDS,
    BACKEND_NAME,
    CONFIG_ENV,
    TRITON_ATTENTION_BACKEND,
    AdapterConfigError,
    Granularity,
    SGLangPolicyConfig,
    TokenVote,
    attention_backend_for,
    config_from_env,
    parse_policy_flags,
)
from kvpolicy.lab.testbed import MODEL_DIR, SURROGATES
from tests.adapters.sglang.conftest import root_logging_restored, sglang_or_skip

# What every parse below starts from: the bundled model, on CPU (SGLang's parser reads nothing else from it).
BASE = ["--model-path", str(MODEL_DIR), "--device", "cpu"]
PREPARE_TARGET = "sglang.srt.server_args.prepare_server_args"


@pytest.fixture(autouse=True)
def _no_policy_in_env(monkeypatch):
    """No launcher configuration in the environment, and none left behind: ``apply_launch_flags`` writes
    ``os.environ``. (``delenv`` of an absent variable records nothing to undo, hence the ``setenv`` first.)"""
    monkeypatch.setenv(CONFIG_ENV, "")
    monkeypatch.delenv(CONFIG_ENV)


def _window_env() -> str:
    """The ``KVPOLICY_SGLANG_CONFIG`` value the launcher hands on for ``--kv-policy window``."""
    return launch.build_launch(["--kv-policy", "window"]).env[CONFIG_ENV]


# -- flags and config (no SGLang) ------------------------------------------------------------------------


def test_valid_flags_parse():
    config = parse_policy_flags("window", '{"threshold": -2.5, "window": 16}')
    assert config == SGLangPolicyConfig(policy="window", policy_config={"threshold": -2.5, "window": 16})
    assert config.granularity is Granularity.HEAD and config.slot_expansion == 2
    policy = config.build_policy()
    assert (policy.config.threshold, policy.config.window) == (-2.5, 16)
    assert parse_policy_flags(None, None) is None


@pytest.mark.parametrize(
    "fields",
    [
        dict(granularity="token"),
        dict(granularity="token", token_vote="any"),
        dict(granularity="token", token_vote="fraction"),
        dict(granularity="token", token_vote="fraction", min_keep_fraction=1.0),
        dict(granularity="head", slot_expansion=1),
        dict(slot_expansion=16),
    ],
    ids=["token", "token-any", "token-fraction-default", "fraction-1.0", "head-expansion-1", "expansion-16"],
)
def test_valid_granularity_vote_and_expansion_combinations(fields):
    config = parse_policy_flags("window", None, **fields)
    assert config.model_dump(mode="json", include=set(fields)) == fields


INVALID_FLAGS = {
    "unknown-policy": (dict(policy="no_such_policy"), "unknown policy 'no_such_policy'"),
    "bad-json": (dict(policy_config_json="{not json"), "--kv-policy-config is not valid JSON"),
    "json-list": (dict(policy_config_json="[1, 2]"), "--kv-policy-config must be a JSON object, got list"),
    "json-string": (dict(policy_config_json='"window"'), "must be a JSON object, got str"),
    "unknown-field": (dict(policy_config_json='{"treshold": 1}'), "invalid --kv-policy-config for 'window'"),
    "oracle-kvzip-plus": (dict(policy="kvzip_plus"), "'kvzip_plus' is an oracle"),
    "ratio-mode": (dict(policy_config_json='{"ratio": 0.5}'), "threshold selection only (got ratio)"),
    "nan-threshold": (dict(policy_config_json='{"threshold": NaN}'), "threshold must not be NaN"),
    "config-without-policy": (dict(policy=None, policy_config_json="{}"), "--kv-policy-config given without"),
    "vote-with-head": (dict(granularity="head", token_vote="fraction"), "apply to granularity='token' only"),
    "vote-default-head": (dict(token_vote="any"), "apply to granularity='token' only"),
    "min-keep-with-head": (dict(min_keep_fraction=0.5), "apply to granularity='token' only"),
    "min-keep-any-vote": (dict(granularity="token", token_vote="any", min_keep_fraction=0.5),
                          "min_keep_fraction applies to token_vote='fraction' only"),
    "min-keep-default-vote": (dict(granularity="token", min_keep_fraction=0.5),
                              "min_keep_fraction applies to token_vote='fraction' only"),
    "min-keep-0": (dict(granularity="token", token_vote="fraction", min_keep_fraction=0.0), "greater than 0"),
    "min-keep-1.5": (dict(granularity="token", token_vote="fraction", min_keep_fraction=1.5),
                     "less than or equal to 1"),
    "slot-expansion-0": (dict(slot_expansion=0), "greater than or equal to 1"),
    "slot-expansion-17": (dict(slot_expansion=17), "less than or equal to 16"),
    "unknown-granularity": (dict(granularity="layer"), "granularity\n  Input should be 'head' or 'token'"),
    "unknown-vote": (dict(granularity="token", token_vote="median"),
                     "token_vote\n  Input should be 'any' or 'fraction'"),
}


@pytest.mark.parametrize("fields, message", INVALID_FLAGS.values(), ids=INVALID_FLAGS.keys())
def test_invalid_flags_refused_with_clear_message(fields, message):
    fields = {"policy": "window", "policy_config_json": None, **fields}
    with pytest.raises(AdapterConfigError) as excinfo:
        parse_policy_flags(fields.pop("policy"), fields.pop("policy_config_json"), **fields)
    assert message in str(excinfo.value)


@pytest.mark.parametrize("threshold", [-math.inf, math.inf], ids=["-inf", "+inf"])
def test_infinite_threshold_survives_the_launch_handoff(threshold):
    """The scheduler rebuilds the policy from the launcher's JSON: +-inf must not come back as null (which
    would silently mean the policy's default threshold)."""
    plan = launch.build_launch(["--kv-policy", "window", "--kv-policy-config",
                                json.dumps({"threshold": threshold, "window": 8})])
    for config in (config_from_env({CONFIG_ENV: plan.env[CONFIG_ENV]}),
                   SGLangPolicyConfig.model_validate_json(plan.env[CONFIG_ENV])):  # what prepare_with_policy reads
        assert config == plan.config
        assert config.build_policy().config.threshold == threshold


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(dict(), id="head"),
        pytest.param(dict(granularity="token"), id="token-any"),
        pytest.param(dict(granularity="token", token_vote="fraction", min_keep_fraction=0.25), id="token-fraction"),
    ],
)
@pytest.mark.parametrize("threshold", [-math.inf, math.inf], ids=["-inf", "+inf"])
def test_config_json_round_trips_through_the_environment(fields, threshold):
    config = SGLangPolicyConfig(policy="window", policy_config={"threshold": threshold}, **fields)
    assert config_from_env({CONFIG_ENV: config.model_dump_json()}) == config


def test_config_from_env_without_or_with_a_broken_value():
    assert config_from_env({}) is None and config_from_env({CONFIG_ENV: ""}) is None
    with pytest.raises(AdapterConfigError, match=f"{CONFIG_ENV} is not a valid"):
        config_from_env({CONFIG_ENV: "{"})
    with pytest.raises(AdapterConfigError, match=f"{CONFIG_ENV} is not a valid"):
        config_from_env({CONFIG_ENV: '{"policy": "window", "slot_expansion": 0}'})


def test_build_launch_splits_the_flags_and_hands_on_what_was_set():
    argv = ["--model-path", "Qwen/Qwen3-8B", "--kv-policy=window", "--port", "30000", "--kv-granularity", "token",
            "--kv-cache-dtype", "auto", "--kv-token-vote", "fraction", "--kv-min-keep-fraction", "0.25",
            "--kv-slot-expansion", "4", "--kv-policy-config", '{"window": 8}']
    plan = launch.build_launch(argv)
    # SGLang's own flags, in order; --kv-cache-dtype is SGLang's, not ours.
    assert plan.sglang_argv == ["--model-path", "Qwen/Qwen3-8B", "--port", "30000", "--kv-cache-dtype", "auto"]
    assert plan.config == SGLangPolicyConfig(policy="window", policy_config={"window": 8}, granularity="token",
                                             token_vote="fraction", min_keep_fraction=0.25, slot_expansion=4)
    assert json.loads(plan.env[CONFIG_ENV]) == {
        "policy": "window", "policy_config": {"window": 8}, "granularity": "token", "token_vote": "fraction",
        "min_keep_fraction": 0.25, "slot_expansion": 4}
    assert config_from_env(plan.env) == plan.config
    # Unset fields stay unset, so the scheduler sees the same defaults and the same validation.
    assert json.loads(_window_env()) == {"policy": "window"}


def test_apply_launch_flags_leaves_a_plain_command_line_alone():
    argv = [*BASE, "--page-size", "16", "--kv-cache-dtype", "auto"]
    assert launch.apply_launch_flags(argv) == argv and CONFIG_ENV not in os.environ
    assert launch.apply_launch_flags([*BASE, "--kv-policy", "window"]) == BASE
    assert config_from_env() == SGLangPolicyConfig(policy="window")


def test_query_capturing_policy_refused_by_the_launcher(capsys):
    flags = ["--kv-policy", "snapkv", "--kv-policy-config", '{"threshold": 0}']
    with pytest.raises(AdapterConfigError, match="'snapkv' needs queries, which the SGLang adapter cannot capture"):
        launch.build_launch([*BASE, *flags])
    assert launch.main([*BASE, *flags]) == launch.EXIT_REFUSED
    assert "kvpolicy: refused: policy 'snapkv' needs queries" in capsys.readouterr().err
    assert CONFIG_ENV not in os.environ


def _kvzap_flags() -> list[str]:
    return ["--kv-policy", "kvzap_mlp", "--kv-policy-config",
            json.dumps({"surrogate": str(SURROGATES["mlp"]), "threshold": -4})]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_size", 96, "input_dim=128 but the model's hidden_size=96"),
        ("num_key_value_heads", 2, "output_dim=4 but the model's num_kv_heads=2"),
        ("num_hidden_layers", 2, "n_modules=3 but the model's num_layers=2"),
    ],
    ids=["hidden-size", "kv-heads", "layers"],
)
def test_kvzap_surrogate_that_does_not_fit_a_local_model_is_refused(tmp_path, field, value, message):
    hf_config = json.loads((MODEL_DIR / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, field: value}))
    for model_flag in (["--model-path", str(tmp_path)], [f"--model-path={tmp_path}"]):
        with pytest.raises(AdapterConfigError, match=f"policy 'kvzap_mlp' does not fit the model: .*{message}"):
            launch.build_launch([*model_flag, "--device", "cpu", *_kvzap_flags()])


def test_kvzap_surrogate_that_fits_is_accepted():
    plan = launch.build_launch([*BASE, *_kvzap_flags()])  # the bundled surrogate was trained on the bundled model
    assert plan.config.policy == "kvzap_mlp" and plan.sglang_argv == BASE
    # Not a local directory: nothing to check here (the scheduler checks against the loaded model).
    launch.build_launch(["--model-path", "Qwen/Qwen3-8B", *_kvzap_flags()])


def _parsed(**fields):
    return SimpleNamespace(**{"device": "cpu", "disable_overlap_schedule": False, "disable_cuda_graph": False,
                              **fields})


def _fixed(attention_backend: str) -> list[str]:
    return ["--radix-cache-backend", BACKEND_NAME, "--attention-backend", attention_backend, "--page-size", "1"]


def test_additions_disable_cuda_graphs_off_cpu_only():
    cpu, cuda = _fixed(ATTENTION_BACKEND), _fixed(TRITON_ATTENTION_BACKEND)
    assert launch.additions(_parsed()) == [*cpu, "--disable-overlap-schedule"]
    assert launch.additions(_parsed(device="cuda")) == [*cuda, "--disable-overlap-schedule", "--disable-cuda-graph"]
    assert launch.additions(_parsed(device="cuda", disable_overlap_schedule=True, disable_cuda_graph=True)) == cuda


@pytest.mark.parametrize(("device", "backend"), [("cpu", ATTENTION_BACKEND), ("cuda", TRITON_ATTENTION_BACKEND),
                                                 ("cuda:1", TRITON_ATTENTION_BACKEND), ("xpu", ATTENTION_BACKEND)])
def test_attention_backend_follows_the_server_device(device, backend):
    assert attention_backend_for(device) == backend
    for asked in (None, "torch_native"):
        added = launch.additions(_parsed(device=device, attention_backend=asked))
        assert added[added.index("--attention-backend") + 1] == backend


def test_unset_device_is_resolved_the_way_sglang_resolves_it(monkeypatch):
    sglang_or_skip()
    from sglang.srt.utils import common

    monkeypatch.setattr(common, "get_device", lambda device_id=None: "cuda")
    assert launch.server_device(_parsed(device=None)) == "cuda"
    assert _fixed(TRITON_ATTENTION_BACKEND) == launch.additions(_parsed(device=None))[:6]
    monkeypatch.setattr(common, "get_device", lambda device_id=None: "cpu")
    assert launch.additions(_parsed(device=None)) == [*_fixed(ATTENTION_BACKEND), "--disable-overlap-schedule"]


def test_launcher_main_requires_a_policy(capsys):
    assert launch.main(BASE) == launch.EXIT_REFUSED
    assert "kvpolicy: refused: --kv-policy NAME is required" in capsys.readouterr().err


def test_sglang_extra_pins_a_supported_version():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    pins = pyproject["project"]["optional-dependencies"]["sglang"]
    assert pins and all(pin.startswith("sglang==") for pin in pins)
    assert {pin.removeprefix("sglang==") for pin in pins} <= set(SUPPORTED_SGLANG_VERSIONS)


# -- token vote ---------------------------------------------------------------------------------------


def _decisions():
    """2 layers x 2 KV heads, 2 sequences, 4 tokens. Entries kept (of 4) per token, sequence 0: 1, 3, 0, 2;
    sequence 1: 4, 0, 2, 1."""
    layer0 = torch.tensor([[[1, 1, 0, 1], [0, 1, 0, 0]],
                           [[1, 0, 1, 0], [1, 0, 0, 0]]], dtype=torch.bool)
    layer1 = torch.tensor([[[0, 1, 0, 1], [0, 0, 0, 0]],
                           [[1, 0, 1, 1], [1, 0, 0, 0]]], dtype=torch.bool)
    from kvpolicy.selection import Decision

    return [Decision(0, 4, layer0), Decision(1, 4, layer1)]


@pytest.mark.parametrize(
    "vote, min_keep_fraction, expected",
    [
        (TokenVote.ANY, 0.5, [[1, 1, 0, 1], [1, 0, 1, 1]]),
        (TokenVote.FRACTION, 0.5, [[0, 1, 0, 1], [1, 0, 1, 0]]),  # 2 of 4 is enough: >=
        (TokenVote.FRACTION, 0.25, [[1, 1, 0, 1], [1, 0, 1, 1]]),
        (TokenVote.FRACTION, 0.75, [[0, 1, 0, 0], [1, 0, 0, 0]]),
        (TokenVote.FRACTION, 1.0, [[0, 0, 0, 0], [1, 0, 0, 0]]),
    ],
    ids=["any", "fraction-0.5", "fraction-0.25", "fraction-0.75", "fraction-1"],
)
def test_vote_tokens(vote, min_keep_fraction, expected):
    from kvpolicy.adapters.sglang.token_vote import vote_tokens

    keep = vote_tokens(_decisions(), vote, min_keep_fraction)
    assert keep.dtype == torch.bool and keep.tolist() == [[bool(x) for x in row] for row in expected]


def test_vote_tokens_refuses_inconsistent_inputs():
    from kvpolicy.adapters.sglang.token_vote import vote_tokens
    from kvpolicy.selection import Decision

    layer0, layer1 = _decisions()
    with pytest.raises(ValueError, match="at least one layer"):
        vote_tokens([])
    with pytest.raises(ValueError, match=r"different numbers of tokens: \[3, 4\]"):
        vote_tokens([layer0, Decision(1, 3, layer1.keep[:, :, :3])])
    with pytest.raises(ValueError, match="min_keep_fraction must be in"):
        vote_tokens([layer0, layer1], TokenVote.FRACTION, 0.0)


# -- SGLang's own parser --------------------------------------------------------------------------------


@pytest.fixture
def sglang_registries(monkeypatch):
    """SGLang's process-global plugin state without kvpolicy's entries, restored afterwards: the hook registry
    (empty), the attention-backend choices and registry, the radix-cache registry, and the launcher's
    registered-once flag."""
    sglang_or_skip()
    from collections import defaultdict

    from sglang.srt.arg_groups import choices
    from sglang.srt.layers.attention import attention_registry
    from sglang.srt.mem_cache import registry as radix_registry
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.setattr(HookRegistry, "_hooks", defaultdict(list))
    monkeypatch.setattr(HookRegistry, "_patched", set())
    monkeypatch.setattr(attention_registry, "ATTENTION_BACKENDS",
                        {k: v for k, v in attention_registry.ATTENTION_BACKENDS.items() if k not in ATTENTION_BACKENDS})
    monkeypatch.setattr(radix_registry, "_RADIX_CACHE_REGISTRY",
                        {k: v for k, v in radix_registry._RADIX_CACHE_REGISTRY.items() if k != BACKEND_NAME})
    monkeypatch.setattr(launch, "_launch_hook_registered", False)
    # add_attention_backend_choices is the bound .extend of this very list: edit it in place.
    saved_choices = list(choices.ATTENTION_BACKEND_CHOICES)
    choices.ATTENTION_BACKEND_CHOICES[:] = [c for c in saved_choices if c not in ATTENTION_BACKENDS]
    yield SimpleNamespace(hooks=HookRegistry, choices=choices.ATTENTION_BACKEND_CHOICES,
                          attention=attention_registry, radix=radix_registry)
    choices.ATTENTION_BACKEND_CHOICES[:] = saved_choices


@pytest.fixture
def prepare_server_args(sglang_registries):
    """SGLang's ``prepare_server_args``, after the plugin registered as ``load_plugins()`` does in the launcher
    process (no policy in the environment yet)."""
    from sglang.srt.server_args import prepare_server_args

    from kvpolicy.adapters.sglang import plugin

    plugin.register()
    with root_logging_restored():
        yield prepare_server_args


def _with_policy(policy_from: str, monkeypatch, argv: list[str]) -> list[str]:
    """``--kv-policy window`` on the command line, or the launcher's environment variable already set."""
    if policy_from == "argv":
        return [*argv, "--kv-policy", "window"]
    monkeypatch.setenv(CONFIG_ENV, _window_env())
    return argv


REFUSED = {
    "page-size": (["--page-size", "16"], "page size 16"),
    "page-size-abbrev": (["--page-s", "16"], "page size 16"),
    # Tensor and data parallelism are served (docs/scaling.md); what they cannot be combined with is refused.
    "tp-heads-alias": (["--tensor-parallel-size", "3"], "tensor parallelism (tp_size = 3) over 4 KV heads"),
    "tp-cpu-padding": (["--tp", "8"], "tensor parallelism (tp_size = 8) over 4 KV heads"),
    "pp": (["--pipeline-parallel-size", "2"], "pipeline parallelism (pp_size = 2)"),
    "attn-cp": (["--tp", "2", "--attn-cp-size", "2"], "context parallelism (attn_cp_size = 2)"),
    "dcp": (["--tp", "2", "--dcp-size", "2"], "context parallelism (dcp_size = 2)"),
    "no-radix-abbrev": (["--disable-radix"], "--disable-radix-cache"),
    "speculative": (["--speculative-algorithm", "EAGLE"], "speculative decoding (EAGLE)"),
    "hicache": (["--enable-hierarchical-cache"], "the hierarchical cache"),
    "disaggregation": (["--disaggregation-mode", "prefill"], "prefill/decode disaggregation (prefill)"),
    "mixed-chunk": (["--enable-mixed-chunk"], "--enable-mixed-chunk"),
    "attention-triton": (["--attention-backend", "triton"], "--attention-backend triton"),
    "decode-attention-triton": (["--decode-attention-backend", "triton"], "--decode-attention-backend triton"),
    "kv-fp8": (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3"),
    "radix-backend": (["--radix-cache-backend", "lmcache"], "--radix-cache-backend lmcache"),
}


@pytest.mark.parametrize("policy_from", ["argv", "env"])
@pytest.mark.parametrize("extra, reason", REFUSED.values(), ids=REFUSED.keys())
def test_parsed_arguments_refused(prepare_server_args, monkeypatch, capsys, policy_from, extra, reason):
    argv = _with_policy(policy_from, monkeypatch, [*BASE, *extra])
    with pytest.raises(SystemExit) as excinfo:
        launch.prepare_with_policy(prepare_server_args, argv)
    err = capsys.readouterr().err
    # argparse errors exit with 2 too: the reason is what tells a refusal apart.
    assert excinfo.value.code == 2 and "kvpolicy: refused: --kv-policy does not support" in err and reason in err


def test_config_file_refused_like_the_command_line(prepare_server_args, tmp_path, capsys):
    config = tmp_path / "serve.yaml"
    config.write_text("page-size: 16\n")
    with pytest.raises(SystemExit) as excinfo:
        launch.prepare_with_policy(prepare_server_args, [*BASE, "--kv-policy", "window", "--config", str(config)])
    assert excinfo.value.code == 2 and "kvpolicy: refused: --kv-policy does not support page size 16" in \
        capsys.readouterr().err


def test_every_refusal_is_reported_at_once(prepare_server_args, capsys):
    with pytest.raises(SystemExit):
        launch.prepare_with_policy(prepare_server_args, [*BASE, "--kv-policy", "window", "--tp", "3", "--page-size",
                                                         "16", "--enable-mixed-chunk"])
    err = capsys.readouterr().err
    assert all(reason in err for reason in ("page size 16", "tensor parallelism", "--enable-mixed-chunk"))


@pytest.mark.parametrize("policy_from", ["argv", "env"])
@pytest.mark.parametrize(("extra", "tp", "dp"), [
    (["--tp", "2"], 2, 1), (["--tensor-parallel-size", "4"], 4, 1), (["--data-parallel-size", "2"], 1, 2),
    (["--tp", "2", "--dp", "2"], 2, 2)], ids=["tp2", "tp4-alias", "dp2", "tp2-dp2"])
def test_tensor_and_data_parallelism_accepted(prepare_server_args, monkeypatch, capsys, policy_from, extra, tp, dp):
    argv = _with_policy(policy_from, monkeypatch, [*BASE, *extra])
    args = launch.prepare_with_policy(prepare_server_args, argv)
    assert (args.radix_cache_backend, args.tp_size, args.dp_size) == (BACKEND_NAME, tp, dp)
    assert "kvpolicy: serving with policy 'window'" in capsys.readouterr().err


def test_token_granularity_with_tensor_parallelism_refused(prepare_server_args, capsys):
    argv = [*BASE, "--kv-policy", "window", "--kv-granularity", "token", "--tp", "2"]
    with pytest.raises(SystemExit) as excinfo:
        launch.prepare_with_policy(prepare_server_args, argv)
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and "--kv-granularity token with tensor parallelism (tp_size = 2)" in err
    # the same vote with one rank, and data parallelism, are fine
    args = launch.prepare_with_policy(prepare_server_args, [*BASE, "--kv-policy", "window", "--kv-granularity",
                                                            "token", "--dp", "2"])
    assert args.dp_size == 2


@pytest.mark.parametrize("policy_from", ["argv", "env"])
@pytest.mark.parametrize("extra", [[], ["--attention-backend", "torch_native"], ["--page-size", "1"]],
                         ids=["plain", "torch-native-overridden", "page-size-1"])
def test_accepted_arguments_get_the_adapter_additions(prepare_server_args, monkeypatch, capsys, policy_from, extra):
    argv = _with_policy(policy_from, monkeypatch, [*BASE, "--max-total-tokens", "256", *extra])
    args = launch.prepare_with_policy(prepare_server_args, argv)
    assert (args.radix_cache_backend, args.attention_backend, args.page_size) == (BACKEND_NAME, ATTENTION_BACKEND, 1)
    assert args.disable_overlap_schedule is True
    assert args.max_total_tokens == 256 and args.device == "cpu"  # the user's own arguments are kept
    assert config_from_env() == SGLangPolicyConfig(policy="window")  # what the scheduler processes will read
    assert "kvpolicy: serving with policy 'window', per-head eviction" in capsys.readouterr().err


@pytest.mark.parametrize(("device", "extra", "backend"), [
    ("cpu", [], ATTENTION_BACKEND),
    ("cpu", ["--attention-backend", "torch_native"], ATTENTION_BACKEND),
    ("cpu", ["--attention-backend", TRITON_ATTENTION_BACKEND], TRITON_ATTENTION_BACKEND),
    ("cuda", [], TRITON_ATTENTION_BACKEND),
    ("cuda", ["--attention-backend", ATTENTION_BACKEND], ATTENTION_BACKEND),
], ids=["cpu", "cpu-torch-native", "cpu-triton-asked", "cuda", "cuda-rows-asked"])
def test_sglang_parse_picks_the_head_row_backend_for_the_device(prepare_server_args, capsys, device, extra, backend):
    """SGLang's own parse of a CUDA server gets kvpolicy_triton and no CUDA graphs, a CPU server kvpolicy_rows;
    a head-row backend asked for by name is kept."""
    argv = ["--model-path", str(MODEL_DIR), "--device", device, *extra, "--kv-policy", "window"]
    args = launch.prepare_with_policy(prepare_server_args, argv)
    assert (args.device, args.attention_backend) == (device, backend)
    assert args.disable_cuda_graph is (device == "cuda")
    assert f"--attention-backend {backend}" in capsys.readouterr().err


def test_without_a_policy_sglang_parses_alone(prepare_server_args, capsys):
    argv = [*BASE, "--page-size", "16", "--attention-backend", "triton"]  # both refused under a policy
    args = launch.prepare_with_policy(prepare_server_args, argv)
    assert args == prepare_server_args(argv)
    assert (args.page_size, args.attention_backend, args.radix_cache_backend) == (16, "triton", None)
    assert CONFIG_ENV not in os.environ and "kvpolicy" not in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--prefill-attention-backend", "--decode-attention-backend"])
def test_split_attention_backend_never_reads_the_head_row_pool_densely(prepare_server_args, sglang_registries,
                                                                       monkeypatch, capsys, flag):
    from sglang.srt.arg_groups.overrides import attention_backends_of

    from kvpolicy.adapters.sglang import plugin

    monkeypatch.setenv(CONFIG_ENV, _window_env())
    plugin.register()  # as in a scheduler process: the attention backends are registered
    try:
        args = launch.prepare_with_policy(prepare_server_args, [*BASE, flag, "torch_native"])
    except SystemExit as exc:  # refusing is one correct answer
        assert exc.code == 2 and "kvpolicy: refused:" in capsys.readouterr().err
        return
    # The other: every phase's backend is built by the same factory as kvpolicy_rows.
    registry = sglang_registries.attention.ATTENTION_BACKENDS
    backends = attention_backends_of(args)  # (prefill, decode), split fields falling back to --attention-backend
    assert all(registry.get(name) is registry[ATTENTION_BACKEND] for name in backends), backends


# -- the plugin ---------------------------------------------------------------------------------------------


def test_plugin_entry_point_is_declared():
    from importlib.metadata import entry_points

    from kvpolicy.adapters.sglang import plugin

    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "kvpolicy"]
    assert [ep.value for ep in eps] == ["kvpolicy.adapters.sglang.plugin:register"]
    assert eps[0].load() is plugin.register


def _registered_hooks(hooks) -> dict[str, list]:
    return {target: [(kind.value, getattr(fn, "__name__", fn)) for kind, fn, _ in entries]
            for target, entries in hooks._hooks.items()}


def test_register_without_a_policy_adds_the_launch_hook_and_the_backend_choice_once(sglang_registries):
    from kvpolicy.adapters.sglang import plugin

    plugin.register()
    plugin.register()  # SGLang calls load_plugins() in several places
    assert all(sglang_registries.choices.count(name) == 1 for name in ATTENTION_BACKENDS)
    assert _registered_hooks(sglang_registries.hooks) == {PREPARE_TARGET: [("around", "_around_prepare_server_args")]}
    # No policy configured: nothing is built for a scheduler.
    assert sglang_registries.radix.get_radix_cache_factory(BACKEND_NAME) is None
    assert not set(ATTENTION_BACKENDS) & sglang_registries.attention.ATTENTION_BACKENDS.keys()


def test_register_with_a_policy_registers_the_cache_pool_and_attention_backends_once(sglang_registries,
                                                                                     monkeypatch):
    from kvpolicy.adapters.sglang import plugin
    from kvpolicy.adapters.sglang.row_attention import HeadRowAttnBackend
    from kvpolicy.adapters.sglang.triton_attention import HeadRowTritonAttnBackend

    monkeypatch.setenv(CONFIG_ENV, _window_env())
    plugin.register()
    plugin.register()
    assert sglang_registries.radix.get_radix_cache_factory(BACKEND_NAME) is plugin.radix_cache_factory
    assert sglang_registries.attention.ATTENTION_BACKENDS[ATTENTION_BACKEND] is HeadRowAttnBackend
    assert sglang_registries.attention.ATTENTION_BACKENDS[TRITON_ATTENTION_BACKEND] is HeadRowTritonAttnBackend
    assert all(sglang_registries.choices.count(name) == 1 for name in ATTENTION_BACKENDS)
    hooks = _registered_hooks(sglang_registries.hooks)
    assert all(len(entries) == 1 for entries in hooks.values()), hooks
    configurator = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
    assert {PREPARE_TARGET, f"{configurator}._build_mha_kv_pool", f"{configurator}._build_token_to_kv_pool_allocator",
            "sglang.srt.managers.scheduler.Scheduler.run_batch"} <= hooks.keys()


def test_register_refuses_a_broken_environment(sglang_registries, monkeypatch):
    from kvpolicy.adapters.sglang import plugin

    monkeypatch.setenv(CONFIG_ENV, '{"policy": ""}')
    with pytest.raises(AdapterConfigError, match=f"{CONFIG_ENV} is not a valid"):
        plugin.register()


# -- the version gate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.5.19", "0.5.22", "0.5.24", "0.6.0"])
def test_unchecked_sglang_versions_refused(version):
    with pytest.raises(UnsupportedSGLangVersion, match=rf"sglang {version} is not supported .*\(supported: 0\.5\.23\)"):
        check_sglang_version(version)
    assert check_sglang_version("0.5.23") == "0.5.23"


def test_installed_sglang_version_passes():
    sglang_or_skip()
    from importlib.metadata import version

    assert check_sglang_version() == version("sglang") == "0.5.23"


def test_missing_sglang_refused():
    import importlib.util

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("SGLang is installed here")
    with pytest.raises(UnsupportedSGLangVersion, match="SGLang is not installed"):
        check_sglang_version()


# -- the real launchers (subprocesses; each refuses before any model loads) ----------------------------------


def _env() -> dict[str, str]:
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}
    env.pop(CONFIG_ENV, None)
    return env


@pytest.mark.slow
def test_real_launchers_refuse_with_exit_status_2():
    sglang_or_skip()
    commands = {
        "tensor parallelism (tp_size = 3)": ["-m", "sglang.launch_server", *BASE, "--kv-policy", "window",
                                             "--tensor-parallel-size", "3"],
        "page size 16": ["-m", "kvpolicy.adapters.sglang.launch", *BASE, "--kv-policy", "window", "--page-s", "16"],
    }
    start = time.monotonic()
    procs = {reason: subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=_env()) for reason, args in commands.items()}
    try:
        for reason, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 2, (commands[reason], proc.returncode, err[-3000:])
            assert f"kvpolicy: refused: --kv-policy does not support {reason}" in err, err[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert time.monotonic() - start < 120


@pytest.mark.slow
def test_kvpolicy_serve_without_a_policy_exits_2():
    proc = subprocess.run([sys.executable, "-m", "kvpolicy", "serve", *BASE], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.returncode == 2 and "kvpolicy: refused: --kv-policy NAME is required" in proc.stderr, proc.stderr


# -- config errors are refusals (exit 2, the reason, no traceback); "none" is no policy; numbers are numbers ----


def _truncated_surrogate(tmp_path):
    import shutil

    directory = shutil.copytree(SURROGATES["mlp"], tmp_path / "kvzap-mlp")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return directory, weights


def test_truncated_surrogate_is_refused_naming_the_file(tmp_path, capsys):
    directory, weights = _truncated_surrogate(tmp_path)
    flags = ["--kv-policy", "kvzap_mlp", "--kv-policy-config", json.dumps({"surrogate": str(directory)})]
    assert launch.main([*BASE, *flags]) == launch.EXIT_REFUSED
    err = capsys.readouterr().err
    assert f"kvpolicy: refused: invalid --kv-policy-config for 'kvzap_mlp': {weights}: not a readable " \
           "safetensors file" in err, err
    assert CONFIG_ENV not in os.environ


@pytest.mark.slow
def test_kvpolicy_serve_with_a_truncated_surrogate_exits_2_without_a_traceback(tmp_path):
    directory, weights = _truncated_surrogate(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "kvpolicy", "serve", *BASE, "--kv-policy", "kvzap_mlp",
                           "--kv-policy-config", json.dumps({"surrogate": str(directory)})],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2, proc.stderr
    assert f"{weights}: not a readable safetensors file" in proc.stderr and "Traceback" not in proc.stderr


def test_a_policy_that_raises_anything_while_built_is_refused(capsys):
    import kvpolicy
    from kvpolicy.policy import EvictionPolicy

    class Exploding(EvictionPolicy):
        def __init__(self, config):
            raise RuntimeError("cannot open the device")

        def score(self, inputs):  # pragma: no cover - never built
            raise AssertionError

    kvpolicy.reload_plugins()
    kvpolicy.register_policy("exploding_for_test", Exploding)
    try:
        assert launch.main([*BASE, "--kv-policy", "exploding_for_test"]) == launch.EXIT_REFUSED
    finally:
        kvpolicy.reload_plugins()
    assert ("kvpolicy: refused: policy 'exploding_for_test' cannot be built from --kv-policy-config: RuntimeError: "
            "cannot open the device") in capsys.readouterr().err


@pytest.mark.parametrize(
    "config_json, message",
    [('{"threshold": "-4"}', "threshold\n  expected a number, got the string '-4'"),
     ('{"threshold": true}', "threshold\n  expected a number, got the bool True"),
     ('{"window": "8"}', "window\n  expected a number, got the string '8'")],
    ids=["str-threshold", "bool-threshold", "str-window"],
)
def test_text_is_not_a_number_in_the_policy_config(config_json, message):
    with pytest.raises(AdapterConfigError, match="invalid --kv-policy-config for 'window'") as err:
        parse_policy_flags("window", config_json)
    assert message in str(err.value)


def test_adapter_fields_are_strict_and_json_numbers_still_work():
    with pytest.raises(ValueError, match="expected a number, got the string '0.5'"):
        SGLangPolicyConfig(policy="window", granularity="token", token_vote="fraction", min_keep_fraction="0.5")
    with pytest.raises(AdapterConfigError, match="expected a number, got the string '4'"):
        config_from_env({CONFIG_ENV: '{"policy": "window", "slot_expansion": "4"}'})
    raw = ('{"policy": "kvzap_mlp", "policy_config": {"surrogate": "%s", "threshold": -4, "window": 32}, '
           '"granularity": "token", "token_vote": "fraction", "min_keep_fraction": 1, "slot_expansion": 4}'
           % SURROGATES["mlp"])
    config = config_from_env({CONFIG_ENV: raw})  # the path is text, -4 and 1 are ints: all accepted
    assert config.min_keep_fraction == 1.0 and config.granularity is Granularity.TOKEN
    assert config.build_policy().config.threshold == -4.0


def test_kv_policy_none_is_plain_sglang(monkeypatch):
    plan = launch.build_launch([*BASE, "--kv-policy", "none", "--port", "30000"])
    assert plan == launch.LaunchPlan(None, [*BASE, "--port", "30000"], {})
    monkeypatch.setenv(CONFIG_ENV, _window_env())  # a configuration left over from elsewhere is not used
    assert launch.apply_launch_flags([*BASE, "--kv-policy=none"]) == BASE
    assert CONFIG_ENV not in os.environ and config_from_env() is None


@pytest.mark.parametrize("flags", [["--kv-policy-config", "{}"], ["--kv-granularity", "token"],
                                   ["--kv-slot-expansion", "4"]], ids=["config", "granularity", "expansion"])
def test_kv_policy_none_takes_no_policy_flags(flags, capsys):
    with pytest.raises(AdapterConfigError, match=f"--kv-policy none \\(no policy\\) takes no {flags[0]}"):
        launch.build_launch([*BASE, "--kv-policy", "none", *flags])
    assert launch.main([*BASE, "--kv-policy", "none", *flags]) == launch.EXIT_REFUSED
    assert "kvpolicy: refused: --kv-policy none (no policy) takes no" in capsys.readouterr().err


def test_kv_policy_none_parses_like_sglang_alone(prepare_server_args, capsys):
    argv = [*BASE, "--page-size", "16"]  # refused under a policy
    args = launch.prepare_with_policy(prepare_server_args, [*argv, "--kv-policy", "none"])
    assert args == prepare_server_args(argv) and args.page_size == 16 and args.radix_cache_backend is None
    assert CONFIG_ENV not in os.environ and "kvpolicy" not in capsys.readouterr().err
