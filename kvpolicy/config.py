"""Validated configuration shared by every policy.

Every policy config subclasses :class:`PolicyConfig`, which carries the *selection* settings (how scores
become a keep-mask). Selection itself lives once, in :mod:`kvpolicy.selection`; policies only score.
"""

from __future__ import annotations

import enum
import math
import types
from typing import Any, ClassVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError


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


def _scalar_kind(annotation: Any) -> str | None:
    """``"number"`` for an int/float field (optional or not), ``"bool"`` for a bool field, else None."""
    members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    members = tuple(m for m in members if m is not type(None))
    if members and all(m in (int, float) for m in members):
        return "number"
    if members == (bool,):
        return "bool"
    return None


class StrictScalarModel(BaseModel):
    """A model whose number and bool fields refuse what pydantic's lax mode would convert silently.

    Lax mode turns ``"-4"`` into -4.0, ``True`` into 1.0 and ``"yes"`` into True: in a user-facing config that
    hides a quoting mistake. Here a number field takes int or float only (an int for a float field is fine;
    bool is not a number) and a bool field takes true/false only. Every other field (paths, enums, literals)
    keeps pydantic's ordinary conversions, so ``surrogate="dir"`` and ``scope="model"`` still work.
    """

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_lax_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        kind = _scalar_kind(field.annotation) if field is not None else None
        if kind == "number" and isinstance(value, (str, bytes, bool)):
            raise PydanticCustomError("number_type", "expected a number, got {got}", {"got": _describe(value)})
        if kind == "bool" and isinstance(value, (str, bytes, int, float)) and not isinstance(value, bool):
            raise PydanticCustomError("bool_type", "expected true or false, got {got}", {"got": _describe(value)})
        return value


def _describe(value: Any) -> str:
    if isinstance(value, (str, bytes)):
        return f"the string {value!r} (write the value without quotes)"
    return f"the {type(value).__name__} {value!r}"


class PolicyConfig(StrictScalarModel):
    """Selection settings common to all policies.

    Exactly one of ``threshold``, ``ratio`` or ``budget`` is active. When none is given, the policy's
    ``default_selection`` applies. Scores are log-space: ``threshold`` is compared with log scores.

    - ``threshold``: any float except NaN. ``-inf`` prunes nothing; ``+inf`` keeps only sinks and window.
    - ``ratio``: fraction of entries to prune, in ``[0, 1)``.
    - ``budget``: number of entries to keep per scope unit (head, layer or model), ``>= 1``.
    - ``window``: the most recent tokens, never pruned (a token is judged once, when it leaves the window).
    - ``sinks``: the first tokens of the sequence, never pruned.

    Numbers must be numbers (``threshold="-4"`` and ``window=True`` are refused, see
    :class:`StrictScalarModel`); subclasses inherit this for their own fields.
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
