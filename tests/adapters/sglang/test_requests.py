"""A policy per request: the allowlist, a request's choice and its prefix-cache namespace (no SGLang needed)."""

from __future__ import annotations

import json
import math
import re

import pytest

from kvpolicy.adapters.sglang.config import AdapterConfigError, SGLangPolicyConfig, config_from_env, parse_and_build
from kvpolicy.adapters.sglang.launch import build_launch
from kvpolicy.adapters.sglang.requests import (
    AllowedPolicy,
    FieldLimit,
    RequestPolicies,
    RequestPolicyError,
    namespace_of,
    parse_allow,
    with_namespace,
)
from kvpolicy.lab.testbed import MODEL_DIR, SURROGATES

KVZAP = {"surrogate": str(SURROGATES["mlp"]), "threshold": -2.0, "window": 16}
ALLOW = {"kvzap_mlp": {"limits": {"threshold": {"min": -6, "max": 0}, "window": {"one_of": [16, 32]}}},
         "window": {"config": {"window": 16}, "limits": {"threshold": {"min": -math.inf}}},
         "none": {}}


def _choices(allow=ALLOW) -> RequestPolicies:
    return RequestPolicies("kvzap_mlp", KVZAP, parse_allow(json.dumps(allow)))  # json writes -inf as -Infinity


def test_allow_names_and_json_forms():
    assert list(parse_allow("kvzap_mlp, window,none")) == ["kvzap_mlp", "window", "none"]
    allowed = parse_allow('{"window": {"config": {"window": 8}, '
                          '"limits": {"threshold": {"min": -Infinity, "max": 0}}}}')
    assert allowed["window"].config == {"window": 8}
    assert allowed["window"].limits["threshold"] == FieldLimit(min=-math.inf, max=0)


@pytest.mark.parametrize("text, message", [
    ("window,,none", "empty policy name"),
    ("window,window", "names a policy twice"),
    ("{", "not valid JSON"),
    ("{}", "names no policy"),
    ('{"kvzap_mlp": {"limits": {"surrogate": {"one_of": [1]}}}}', "only the selection fields"),
    ('{"window": {"limits": {"window": {"min": 8, "max": 4}}}}', "min 8.0 is above max 4.0"),
    ('{"window": {"limits": {"window": {}}}}', "not both and not neither"),
    ('{"window": {"limits": {"window": {"min": 1, "one_of": [2]}}}}', "not both and not neither"),
    ('{"window": {"limits": {"window": {"min": "4"}}}}', "expected a number"),
    ('{"window": {"limit": {}}}', "Extra inputs are not permitted"),
])
def test_bad_allowlists_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_allow(text)


@pytest.mark.parametrize("allow, message", [
    ({"snapkv_typo": {}}, "unknown policy"),
    ({"kvzip_plus": {}}, "is an oracle"),
    ({"none": {"limits": {"window": {"min": 1}}}}, "takes no config or limits"),
    ({"kvzap_mlp": {"config": {"threshold": -3}}}, "its config is --kv-policy-config"),
    ({"knorm": {}}, "threshold selection only, got ratio"),
    ({"window": {"config": {"window": -1}}}, "invalid server config"),
])
def test_allowlists_that_cannot_be_served_refused(allow, message):
    with pytest.raises(ValueError, match=message):
        _choices(allow)


def test_a_request_without_a_choice_gets_the_default():
    choices = _choices()
    for params in (None, {}, {"other_plugin_param": 1}):
        assert choices.resolve(params) == choices.default
    assert choices.default.policy == "kvzap_mlp" and choices.default.config.threshold == -2.0


def test_choices_resolve_within_the_limits():
    choices = _choices()
    picked = choices.resolve({"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": -4, "window": 32}})
    assert (picked.policy, picked.config.threshold, picked.config.window) == ("kvzap_mlp", -4.0, 32)
    assert picked.config.surrogate == choices.default.config.surrogate  # the server's field, not the request's
    window = choices.resolve({"kv_policy": "window"})
    assert (window.config.window, window.window) == (16, 16)
    assert choices.resolve({"kv_policy": "window", "kv_policy_config": {"threshold": -math.inf}}).config.threshold \
        == -math.inf
    none = choices.resolve({"kv_policy": "none"})
    assert (none.config, none.window, none.namespace) == (None, 0, "kvpolicy:none")


@pytest.mark.parametrize("params, message", [
    ({"kv_policy": "snapkv"}, "policy 'snapkv' is not allowed on this server (allowed: kvzap_mlp, window, none)"),
    ({"kv_policy": "kvzip_plus"}, "not allowed"),
    ({"kv_policy": 3}, "must be a policy name"),
    ({"kv_policy_config": {"threshold": -3}}, "needs custom_params.kv_policy"),
    ({"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": 1}}, "threshold=1 is outside this server's limit "
                                                                        "(threshold in [-6, 0])"),
    ({"kv_policy": "kvzap_mlp", "kv_policy_config": {"window": 64}}, "window in {16, 32}"),
    ({"kv_policy": "kvzap_mlp", "kv_policy_config": {"sinks": 4}}, "field 'sinks' cannot be set per request"),
    ({"kv_policy": "kvzap_mlp", "kv_policy_config": {"surrogate": "/tmp/x"}}, "field 'surrogate' cannot be set"),
    ({"kv_policy": "window", "kv_policy_config": {"window": 8}}, "settable: threshold in [-inf, inf]"),
    ({"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": "-3"}}, "threshold must be a number"),
    ({"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": True}}, "threshold must be a number"),
    ({"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": math.nan}}, "threshold must be a number"),
    ({"kv_policy": "kvzap_mlp", "kv_policy_config": [1]}, "must be an object"),
    ({"kv_policy": "none", "kv_policy_config": {"window": 16}}, "takes no kv_policy_config"),
    ({"kv_policy": "window", "kv_policy_typo": 1}, "unknown custom_params 'kv_policy_typo'"),
])
def test_refused_choices_name_the_reason(params, message):
    with pytest.raises(RequestPolicyError, match=re.escape(message)):
        _choices().resolve(params)
    assert RequestPolicyError.status_code == 400 and issubclass(RequestPolicyError, ValueError)  # SGLang: HTTP 400


def test_a_config_the_policy_refuses_is_refused_for_the_request():
    choices = RequestPolicies("window", {}, {"window": AllowedPolicy(limits={"window": FieldLimit(min=0)})})
    with pytest.raises(RequestPolicyError, match="invalid kv_policy_config: window: Input should be a valid integer"):
        choices.resolve({"kv_policy": "window", "kv_policy_config": {"window": 4.5}})


def test_a_server_without_an_allowlist_refuses_any_choice():
    choices = RequestPolicies("window", {}, None)
    assert not choices.per_request and choices.resolve(None).policy == "window"
    with pytest.raises(RequestPolicyError, match="serves one policy .* --kv-policy-allow"):
        choices.resolve({"kv_policy": "window"})


def test_namespaces_follow_the_resolved_config():
    choices = _choices()
    default = choices.default.namespace
    explicit = choices.resolve({"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": -2.0, "window": 16}})
    assert explicit.namespace == default  # the same resolved config shares the cache
    other = choices.resolve({"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": -4}})
    assert other.namespace != default and other.namespace.startswith("kvpolicy:kvzap_mlp:")
    assert _choices().resolve({"kv_policy": "kvzap_mlp", "kv_policy_config": {"threshold": -4}}) == other  # stable
    inf = choices.resolve({"kv_policy": "window", "kv_policy_config": {"threshold": -math.inf}})
    assert inf.namespace not in (choices.resolve({"kv_policy": "window"}).namespace, namespace_of("window", None))
    assert with_namespace(None, "kvpolicy:none") == "kvpolicy:none"
    assert with_namespace("salt", "kvpolicy:none") == "salt|kvpolicy:none"


def test_the_launcher_builds_every_allowed_policy_and_hands_the_allowlist_on(monkeypatch):
    allow = json.dumps({"kvzap_mlp": {"limits": {"threshold": {"min": -6, "max": 0}}},
                        "window": {"config": {"window": 16}}, "none": {}})
    plan = build_launch(["--kv-policy", "kvzap_mlp", "--kv-policy-config", json.dumps(KVZAP), "--kv-policy-allow",
                         allow, "--model-path", str(MODEL_DIR)])
    config = config_from_env(plan.env)
    assert config == plan.config and set(config.allow) == {"kvzap_mlp", "window", "none"}
    assert set(config.build_policies()) == {"kvzap_mlp", "window"}
    assert config.request_policies().resolve({"kv_policy": "window"}).config.window == 16


def test_infinite_limits_survive_the_launch_handoff():
    config, _ = parse_and_build("window", None, allow='{"window": {"limits": {"threshold": {"min": -Infinity}}}}')
    again = SGLangPolicyConfig.model_validate_json(config.model_dump_json(exclude_unset=True))
    assert again.allow["window"].limits["threshold"].min == -math.inf


@pytest.mark.parametrize("policy, allow, message", [
    ("none", "window", "--kv-policy-allow needs a default policy"),
    ("window", '{"kvzap_mlp": {}}', "surrogate"),  # kvzap_mlp without its surrogate cannot be built
    ("window", '{"window": {"limits": {"surrogate": {"one_of": [1]}}}}', "only the selection fields"),
    ("window", "window,kvzip_plus", "is an oracle"),
    # built, then refused: the SGLang adapter cannot capture queries
    ("window", '{"snapkv": {"config": {"threshold": 0}}}', "cannot capture"),
])
def test_launcher_refuses_allowlists_it_cannot_serve(policy, allow, message):
    with pytest.raises(AdapterConfigError, match=message):
        build_launch(["--kv-policy", policy, "--kv-policy-allow", allow, "--model-path", str(MODEL_DIR)])
