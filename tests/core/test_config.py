"""PolicyConfig validation: clear errors that name the field, and the selection-mode rules."""

from __future__ import annotations

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
