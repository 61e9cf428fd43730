"""StreamingLLM (Xiao et al., 2023): attention sinks + a recent window, at a fixed token budget.

Config: ``budget_tokens`` (cache size per head) and ``sinks`` (default 4). The protected window is derived:
``window = budget_tokens - sinks``, so the cache never holds more than ``budget_tokens`` entries once the
sequence is longer than that. Every score is ``-inf`` and selection is threshold mode, so whatever is not a
sink and leaves the window is pruned. ``window`` and ``ratio``/``budget`` cannot be set: they are implied.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from kvpolicy.config import PolicyConfig
from kvpolicy.policies.window import WindowPolicy


class StreamingLLMConfig(PolicyConfig):
    budget_tokens: int = Field(ge=1)
    sinks: int = Field(default=4, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _derive_window(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for implied in ("window", "ratio", "budget"):
            if data.get(implied) is not None:
                raise ValueError(
                    f"streaming_llm derives its selection from budget_tokens and sinks "
                    f"(window = budget_tokens - sinks); do not set {implied!r}"
                )
        budget, sinks = data.get("budget_tokens"), data.get("sinks", 4)
        # bool is an int subclass: leave True/False to the field check, which refuses it by name.
        if (isinstance(budget, int) and isinstance(sinks, int) and sinks >= 0
                and not isinstance(budget, bool) and not isinstance(sinks, bool)):
            if budget <= sinks:
                raise ValueError(f"budget_tokens ({budget}) must be greater than sinks ({sinks}): "
                                 "window = budget_tokens - sinks must be at least 1")
            data = {**data, "window": budget - sinks}
        return data

    @model_validator(mode="after")
    def _threshold_prunes(self) -> StreamingLLMConfig:
        if self.threshold == -float("inf"):
            raise ValueError("threshold=-inf would keep every token; streaming_llm needs a finite threshold")
        return self


class StreamingLLMPolicy(WindowPolicy):
    """The window policy's scores (all ``-inf``); only the configuration differs."""

    config_class = StreamingLLMConfig
