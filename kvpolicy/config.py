"""Validated configuration shared by every policy.

Every policy config subclasses :class:`PolicyConfig`, which carries the *selection* settings (how scores
become a keep-mask). Selection itself lives once, in :mod:`kvpolicy.selection`; policies only score.
"""

from __future__ import annotations

import enum
import math
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SelectionMode(str, enum.Enum):
    """How scores become a keep-mask."""

    THRESHOLD = "threshold"  # prune an entry when score < threshold (strict); works in prefill and decoding
    RATIO = "ratio"  # keep floor(T * (1 - ratio)) entries, highest scores first; prefill only
    BUDGET = "budget"  # keep at most `budget` entries, highest scores first; prefill only


class SelectionScope(str, enum.Enum):
    """Over which set of entries ratio/budget selection ranks scores."""

    HEAD = "head"  # each (layer, kv_head) keeps its own quota
    LAYER = "layer"  # the quota is shared by the kv heads of a layer
    MODEL = "model"  # the quota is shared by all heads of all layers


class PolicyConfig(BaseModel):
    """Selection settings common to all policies.

    Exactly one of ``threshold``, ``ratio`` or ``budget`` is active. When none is given, the policy's
    ``default_selection`` applies. Scores are log-space: ``threshold`` is compared with log scores.

    - ``threshold``: any float except NaN. ``-inf`` prunes nothing; ``+inf`` keeps only sinks and window.
    - ``ratio``: fraction of entries to prune, in ``[0, 1)``.
    - ``budget``: number of entries to keep per scope unit (head, layer or model), ``>= 1``.
    - ``window``: the most recent tokens, never pruned (a token is judged once, when it leaves the window).
    - ``sinks``: the first tokens of the sequence, never pruned.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    default_selection: ClassVar[dict[str, Any]] = {"threshold": 0.0}

    threshold: float | None = None
    ratio: float | None = Field(default=None, ge=0.0, lt=1.0)
    budget: int | None = Field(default=None, ge=1)
    window: int = Field(default=128, ge=0)
    sinks: int = Field(default=0, ge=0)
    scope: SelectionScope = SelectionScope.HEAD

    @model_validator(mode="before")
    @classmethod
    def _apply_default_selection(cls, data: Any) -> Any:
        if isinstance(data, dict) and all(data.get(k) is None for k in ("threshold", "ratio", "budget")):
            data = {**cls.default_selection, **{k: v for k, v in data.items() if v is not None}}
        return data

    @field_validator("threshold")
    @classmethod
    def _threshold_not_nan(cls, value: float | None) -> float | None:
        if value is not None and math.isnan(value):
            raise ValueError("threshold must not be NaN (use -inf to prune nothing, +inf to keep only the window)")
        return value

    @model_validator(mode="after")
    def _exactly_one_mode(self) -> PolicyConfig:
        given = [k for k in ("threshold", "ratio", "budget") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of threshold, ratio, budget (got {given or 'none'})")
        if self.scope is not SelectionScope.HEAD and self.mode is SelectionMode.THRESHOLD:
            raise ValueError("scope applies to ratio/budget selection only; threshold decisions are per entry")
        return self

    @property
    def mode(self) -> SelectionMode:
        if self.threshold is not None:
            return SelectionMode.THRESHOLD
        if self.ratio is not None:
            return SelectionMode.RATIO
        return SelectionMode.BUDGET
