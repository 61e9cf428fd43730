"""Surrogate files that safetensors cannot read: a clear SurrogateFormatError naming the file, not a raw
SafetensorError (the SGLang launcher turns it into a refusal, tests/adapters/sglang)."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.surrogate import (
    WEIGHTS_FILE,
    KVzapSurrogate,
    SurrogateConfig,
    SurrogateFormatError,
    load_surrogate,
    save_surrogate,
)


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    surrogate = KVzapSurrogate(SurrogateConfig(model_type="kvzap", input_dim=16, output_dim=2, n_modules=3,
                                               hidden_dim=8))
    return save_surrogate(surrogate, tmp_path / "kvzap-mlp")


@pytest.mark.parametrize("keep", [0, 5, 40, 0.5, -4], ids=["empty", "5-bytes", "40-bytes", "half", "4-short"])
def test_truncated_weights_are_a_format_error_naming_the_file(saved, keep):
    weights = saved / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(SurrogateFormatError) as err:
        load_surrogate(saved)
    message = str(err.value)
    assert message.startswith(f"{weights}: not a readable safetensors file") and "truncated" in message, message
    # Through the policy too (what `kvpolicy compare` and the SGLang launcher build).
    with pytest.raises(SurrogateFormatError, match="not a readable safetensors file"):
        kvpolicy.get_policy("kvzap_mlp", surrogate=str(saved), threshold=-4)


def test_garbage_weights_are_a_format_error(saved):
    (saved / WEIGHTS_FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(SurrogateFormatError, match="not a readable safetensors file"):
        load_surrogate(saved)


def test_intact_weights_still_load(saved):
    assert load_surrogate(saved).kind == "mlp"
