"""The lab's one policy-spec grammar (kvpolicy.lab.specs) and the checks run before any evaluation."""

from __future__ import annotations

import math

import pytest

from kvpolicy.lab.specs import PolicySpec, SpecError, check_specs, parse_spec, parse_specs, parse_value
from kvpolicy.lab.testbed import SURROGATES
from kvpolicy.policy import ModelInfo


@pytest.mark.parametrize(
    "text, value",
    [("-4", -4), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ("false", False), ("null", None),
     ('"8"', "8"), ("model", "model"), ("/tmp/a b/kvzap-mlp", "/tmp/a b/kvzap-mlp"), ("", ""),
     ("inf", math.inf), ("-inf", -math.inf), ("+inf", math.inf), ("-Infinity", -math.inf)],
    ids=repr,
)
def test_values_are_json_scalars_else_text(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("text", ["[1, 2]", '{"a": 1}'])
def test_lists_and_objects_are_refused(text):
    with pytest.raises(SpecError, match="only scalars"):
        parse_value(text)


def test_spec_with_typed_values():
    [spec] = parse_spec("kvzap_mlp:threshold=-4,surrogate=/x/kvzap-mlp,window=32")
    assert spec == PolicySpec("kvzap_mlp", {"threshold": -4, "surrogate": "/x/kvzap-mlp", "window": 32})
    assert spec.label == "kvzap_mlp(threshold=-4, window=32)"  # the surrogate path is left out of labels
    assert parse_spec("window") == [PolicySpec("window")] and PolicySpec("window").label == "window"
    assert parse_spec(" knorm : ratio = 0.5 ") == [PolicySpec("knorm", {"ratio": 0.5})]


def test_sweeps_expand_to_the_cartesian_product_in_order():
    specs = parse_specs(["none", "window:window=32|64,sinks=0|4", "knorm:ratio=0.5"])
    assert [s.config for s in specs] == [{}, {"window": 32, "sinks": 0}, {"window": 32, "sinks": 4},
                                        {"window": 64, "sinks": 0}, {"window": 64, "sinks": 4}, {"ratio": 0.5}]
    assert specs[0].is_none and not specs[1].is_none


@pytest.mark.parametrize(
    "text, message",
    [
        (":window=1", "has no policy name"),
        ("window:window", "is not key=value"),
        ("window:=3", "is not key=value"),
        ("window:window=1,", "empty key=value item"),
        ("window:", "empty key=value item"),
        ("window:window=1,window=2", "key 'window' given twice"),
        ("window:window=32||64", "empty alternative"),
        ("none:window=8", "takes no configuration"),
        ("kvzip_plus:repeat_prompt_ids=[1]", "only scalars"),
    ],
    ids=lambda v: v if isinstance(v, str) and ":" in v else None,
)
def test_malformed_specs_are_explained(text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text)


def test_check_specs_accepts_valid_ones_and_none():
    assert check_specs(parse_specs(["none", "window:window=32|64", "knorm:ratio=0.5,scope=model",
                                    "kvzap_mlp:threshold=-4"]),
                       configure=lambda s: {"surrogate": str(SURROGATES["mlp"]), **s.config}
                       if s.name == "kvzap_mlp" else s.config) == []


def test_check_specs_finds_every_problem_including_later_sweep_points():
    specs = parse_specs(["window:window=64", "no_such_policy:ratio=0.5|0.6", "knorm:ratio=0.5|1.5",
                         'window:threshold="-4"', "window:window=true", "kvzap_mlp:threshold=-4"])
    problems = check_specs(specs)
    assert len(problems) == 5, problems
    assert problems[0].startswith("'no_such_policy': unknown policy 'no_such_policy'; known:")  # once, not twice
    assert problems[1].startswith("knorm(ratio=1.5): ratio: Input should be less than 1")  # the second point
    assert problems[2] == ("window(threshold=-4): threshold: expected a number, got the string '-4' (write the "
                           "value without quotes)")
    assert problems[3] == "window(window=True): window: expected a number, got the bool True"
    assert problems[4].startswith("kvzap_mlp(threshold=-4): surrogate: Field required")


def test_check_specs_loads_files_and_binds_to_the_model(tmp_path):
    specs = [PolicySpec("kvzap_mlp", {"surrogate": str(tmp_path), "threshold": -4})]
    [problem] = check_specs(specs)
    assert f"{tmp_path}: no config.json" in problem
    fits = ModelInfo(num_layers=3, hidden_size=128, num_attention_heads=8, num_kv_heads=4, head_dim=16)
    other = ModelInfo(num_layers=3, hidden_size=96, num_attention_heads=8, num_kv_heads=4, head_dim=12)
    specs = [PolicySpec("kvzap_mlp", {"surrogate": str(SURROGATES["mlp"]), "threshold": -4})]
    assert check_specs(specs, model_info=fits) == []
    [problem] = check_specs(specs, model_info=other)
    assert "input_dim=128 but the model's hidden_size=96" in problem
