"""PolicyConfig validation: clear errors that name the field, and the selection-mode rules."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from kvpolicy import PolicyConfig, SelectionMode


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": float("nan")}, "threshold"),
        ({"window": -1}, "window"),
        ({"sinks": -2}, "sinks"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"budget": 0}, "budget"),
        ({"scope": "galaxy"}, "scope"),
        ({"thresold": 1.0}, "thresold"),  # typo: extra fields are forbidden
    ],
    ids=lambda v: str(v),
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as err:
        PolicyConfig(**kwargs)
    assert field in str(err.value)


def test_exactly_one_mode():
    with pytest.raises(ValidationError, match="exactly one of threshold, ratio, budget"):
        PolicyConfig(threshold=1.0, ratio=0.5)
    assert PolicyConfig(ratio=0.5).mode is SelectionMode.RATIO
    assert PolicyConfig(budget=3).mode is SelectionMode.BUDGET
    assert PolicyConfig().mode is SelectionMode.THRESHOLD  # the class default applies when none is given


def test_scope_only_for_ranked_modes():
    with pytest.raises(ValidationError, match="scope"):
        PolicyConfig(threshold=0.0, scope="layer")
    assert PolicyConfig(ratio=0.3, scope="model").scope.value == "model"


def test_infinite_thresholds_allowed_and_frozen():
    cfg = PolicyConfig(threshold=-math.inf)
    assert cfg.threshold == -math.inf and PolicyConfig(threshold=math.inf).threshold == math.inf
    with pytest.raises(ValidationError):
        cfg.window = 3  # type: ignore[misc]


def test_subclass_default_selection_is_overridden_by_ratio():
    class Sub(PolicyConfig):
        default_selection = {"threshold": -4.0}

    assert Sub().threshold == -4.0
    sub = Sub(ratio=0.25)
    assert sub.threshold is None and sub.mode is SelectionMode.RATIO


# -- strict types: lax mode would turn "-4" into -4.0, true into 1.0 and "8" into 8 ------------------------------


STRICT_CASES = {
    "str-threshold": ("window", {"threshold": "-4"}, "threshold", "expected a number, got the string '-4'"),
    "bool-threshold": ("window", {"threshold": True}, "threshold", "expected a number, got the bool True"),
    "str-window": ("window", {"window": "8"}, "window", "expected a number, got the string '8'"),
    "bool-window": ("window", {"window": False}, "window", "expected a number, got the bool False"),
    "str-ratio": ("knorm", {"ratio": "0.5"}, "ratio", "expected a number, got the string '0.5'"),
    "str-budget": ("snapkv", {"budget": "16"}, "budget", "expected a number, got the string '16'"),
    "str-sinks": ("window", {"sinks": "4"}, "sinks", "expected a number"),
    "str-seed": ("random", {"seed": "3"}, "seed", "expected a number"),
    "str-obs-window": ("snapkv", {"obs_window": "8"}, "obs_window", "expected a number"),
    "bool-budget-tokens": ("streaming_llm", {"budget_tokens": True}, "budget_tokens", "got the bool True"),
    "str-budget-tokens": ("streaming_llm", {"budget_tokens": "64"}, "budget_tokens", "got the string '64'"),
    "str-chunk-size": ("kvzip_plus", {"chunk_size": "512"}, "chunk_size", "expected a number"),
    "str-normalization": ("kvzip_plus", {"normalization": "false"}, "normalization",
                          "expected true or false, got the string 'false'"),
    "int-normalization": ("kvzip_plus", {"normalization": 0}, "normalization", "expected true or false, got the int 0"),
}


@pytest.mark.parametrize("policy, fields, field, message", STRICT_CASES.values(), ids=STRICT_CASES.keys())
def test_text_and_bools_are_not_numbers(policy, fields, field, message):
    """PolicyConfig and every built-in policy's config subclass (they inherit the check)."""
    import kvpolicy

    config_class = kvpolicy.get_policy_class(policy).config_class
    for validate in (lambda: config_class(**fields), lambda: config_class.model_validate_json(json.dumps(fields))):
        with pytest.raises(ValidationError) as err:
            validate()
        [error] = err.value.errors()
        assert error["loc"] == (field,) and message in error["msg"], error


def test_numbers_of_the_other_kind_and_text_fields_still_convert(tmp_path):
    import kvpolicy
    from kvpolicy.lab.testbed import SURROGATES

    assert PolicyConfig(threshold=-4).threshold == -4.0  # an int for a float field
    assert PolicyConfig.model_validate_json('{"threshold": -4, "window": 8}').window == 8
    assert PolicyConfig(window=8.0).window == 8  # an integral float for an int field (pydantic's own rule)
    with pytest.raises(ValidationError):
        PolicyConfig(window=8.5)
    assert PolicyConfig(ratio=0.5, scope="model").scope.value == "model"  # enums take their text
    policy = kvpolicy.get_policy("kvzap_mlp", surrogate=str(SURROGATES["mlp"]), threshold=-4)  # str -> Path
    assert policy.config.surrogate == SURROGATES["mlp"] and policy.config.threshold == -4.0
    assert kvpolicy.get_policy("kvzip_plus", normalization=False, prompt_suffix="\n").config.normalization is False


def test_a_plugin_config_inherits_the_strict_numbers():
    class PluginConfig(PolicyConfig):
        power: float = 1.0
        label: str = "x"
        limit: int | None = None

    assert PluginConfig(power=2, label="8", limit=None).label == "8"  # text stays text
    for fields in ({"power": "2"}, {"limit": "3"}, {"power": True}):
        with pytest.raises(ValidationError, match="expected a number"):
            PluginConfig(**fields)
