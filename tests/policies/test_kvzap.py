"""KVzap surrogates: NVIDIA checkpoint layout, the two policies, and fitting."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from safetensors.torch import load_file

import kvpolicy
from kvpolicy.policies.kvzap_linear import KVzapLinearConfig, KVzapLinearPolicy
from kvpolicy.policies.kvzap_mlp import KVzapMLPPolicy
from kvpolicy.surrogate import KVzapSurrogate, SurrogateConfig, SurrogateFormatError, load_surrogate, save_surrogate
from tests.policies.helpers import make_inputs, model_info, nvidia_tensors, write_nvidia_checkpoint


@pytest.fixture()
def linear_dir(tmp_path):
    return write_nvidia_checkpoint(tmp_path / "linear", "linear")


@pytest.fixture()
def mlp_dir(tmp_path):
    return write_nvidia_checkpoint(tmp_path / "mlp", "mlp")


def exact_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


# -- the policies -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 2])
def test_linear_policy_equals_manual_matmul(linear_dir, layer):
    policy = kvpolicy.get_policy("kvzap_linear", surrogate=str(linear_dir))
    policy.bind(model_info())
    inputs = make_inputs(layer_idx=layer)
    w = nvidia_tensors("linear")
    expected = (inputs.hidden_states @ w[f"layers.{layer}.weight"].T + w[f"layers.{layer}.bias"]).transpose(1, 2)
    scores = policy.score(inputs)
    assert scores.shape == (2, 2, 13) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected)
    assert torch.equal(scores, policy.score(inputs))


@pytest.mark.parametrize("layer", [0, 1])
def test_mlp_policy_equals_manual_formula_with_exact_gelu(mlp_dir, layer):
    policy = kvpolicy.get_policy("kvzap_mlp", surrogate=str(mlp_dir))
    policy.bind(model_info())
    inputs = make_inputs(layer_idx=layer, tokens=7)
    w = nvidia_tensors("mlp")
    h = exact_gelu(inputs.hidden_states @ w[f"layers.{layer}.0.weight"].T + w[f"layers.{layer}.0.bias"])
    expected = (h @ w[f"layers.{layer}.2.weight"].T + w[f"layers.{layer}.2.bias"]).transpose(1, 2)
    torch.testing.assert_close(policy.score(inputs), expected)
    # tanh-approximate GELU would differ: make sure the test can tell them apart
    approx = torch.nn.functional.gelu(inputs.hidden_states @ w[f"layers.{layer}.0.weight"].T
                                      + w[f"layers.{layer}.0.bias"], approximate="tanh")
    assert not torch.allclose(approx, h, atol=1e-6)


def test_half_precision_hidden_states_score_in_float32(linear_dir):
    policy = kvpolicy.get_policy("kvzap_linear", surrogate=str(linear_dir))
    inputs = make_inputs()
    half = type(inputs)(layer_idx=0, keys=inputs.keys, values=inputs.values, positions=inputs.positions,
                        hidden_states=inputs.hidden_states.bfloat16())
    assert policy.score(half).dtype == torch.float32


def test_defaults_and_flags(linear_dir):
    cfg = KVzapLinearConfig(surrogate=linear_dir)
    assert cfg.threshold == -4.0 and cfg.window == 128
    assert KVzapLinearPolicy.captures == {"hidden_states"} and KVzapLinearPolicy.supports_decoding
    assert KVzapMLPPolicy.captures == {"hidden_states"} and KVzapMLPPolicy.supports_decoding
    with pytest.raises(ValidationError, match="surrogate"):
        KVzapLinearConfig()
    with pytest.raises(ValidationError, match="threshold"):
        KVzapLinearConfig(surrogate=linear_dir, threshold=math.nan)
    with pytest.raises(ValidationError, match="window"):
        KVzapLinearConfig(surrogate=linear_dir, window=-3)
    with pytest.raises(ValidationError, match="ratio"):
        KVzapLinearConfig(surrogate=linear_dir, ratio=1.0)


@pytest.mark.parametrize(("info_kwargs", "field"), [
    ({"hidden": 32}, "input_dim"),
    ({"heads": 4, "q_heads": 8}, "output_dim"),
    ({"layers": 4}, "n_modules"),
], ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_bind_rejects_mismatched_model(tmp_path, kind, info_kwargs, field):
    directory = write_nvidia_checkpoint(tmp_path / kind, kind)
    policy = kvpolicy.get_policy(f"kvzap_{kind}", surrogate=str(directory))
    with pytest.raises(ValueError, match=field):
        policy.bind(model_info(**info_kwargs))


def test_policy_rejects_the_other_kind(linear_dir, mlp_dir):
    with pytest.raises(ValueError, match="kvzap_mlp"):
        kvpolicy.get_policy("kvzap_linear", surrogate=str(mlp_dir))
    with pytest.raises(ValueError, match="kvzap_linear"):
        kvpolicy.get_policy("kvzap_mlp", surrogate=str(linear_dir))


def test_score_needs_hidden_states(linear_dir):
    inputs = make_inputs()
    bare = type(inputs)(layer_idx=0, keys=inputs.keys, values=inputs.values, positions=inputs.positions)
    with pytest.raises(ValueError, match="hidden_states"):
        kvpolicy.get_policy("kvzap_linear", surrogate=str(linear_dir)).score(bare)


# -- the checkpoint format ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_round_trip_keeps_nvidia_layout(tmp_path, kind):
    src = write_nvidia_checkpoint(tmp_path / "src", kind, seed=4)
    surrogate = load_surrogate(src)
    out = save_surrogate(surrogate, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "kvzap"
    assert (config["input_dim"], config["output_dim"], config["n_modules"]) == (16, 2, 3)
    assert config["hidden_dim"] == (6 if kind == "mlp" else None)
    original, written = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(original) == sorted(written)
    for name in original:
        assert torch.equal(original[name], written[name]), name
    again = load_surrogate(out)
    x = torch.randn(5, 16)
    torch.testing.assert_close(again(1, x), surrogate(1, x), rtol=0, atol=0)


def test_missing_tensor_is_named(tmp_path):
    tensors = nvidia_tensors("mlp")
    del tensors["layers.1.2.bias"]
    directory = write_nvidia_checkpoint(tmp_path / "m", "mlp", tensors=tensors)
    with pytest.raises(SurrogateFormatError, match=r"missing tensor 'layers\.1\.2\.bias'"):
        load_surrogate(directory)


def test_misshapen_tensor_is_named(tmp_path):
    tensors = nvidia_tensors("linear")
    tensors["layers.2.weight"] = torch.zeros(2, 15)
    directory = write_nvidia_checkpoint(tmp_path / "m", "linear", tensors=tensors)
    with pytest.raises(SurrogateFormatError, match=r"'layers\.2\.weight' has shape \(2, 15\), expected \(2, 16\)"):
        load_surrogate(directory)


def test_extra_tensor_and_bad_config_rejected(tmp_path):
    tensors = {**nvidia_tensors("linear"), "layers.3.weight": torch.zeros(2, 16)}
    with pytest.raises(SurrogateFormatError, match="unexpected tensors"):
        load_surrogate(write_nvidia_checkpoint(tmp_path / "a", "linear", tensors=tensors))
    with pytest.raises(SurrogateFormatError, match="model_type"):
        load_surrogate(write_nvidia_checkpoint(tmp_path / "b", "linear", config_overrides={"model_type": "llama"}))
    with pytest.raises(SurrogateFormatError, match="n_modules"):
        load_surrogate(write_nvidia_checkpoint(tmp_path / "c", "linear", config_overrides={"n_modules": 0}))
    with pytest.raises(FileNotFoundError):
        load_surrogate(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SurrogateFormatError, match="config.json"):
        load_surrogate(tmp_path / "empty")


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_files_are_never_loaded(tmp_path):
    tripwire = tmp_path / "pickle-was-loaded"
    only_pickle = tmp_path / "only-pickle"
    only_pickle.mkdir()
    (only_pickle / "config.json").write_text(json.dumps(
        {"model_type": "kvzap", "input_dim": 16, "output_dim": 2, "n_modules": 3, "hidden_dim": None}))
    (only_pickle / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(tripwire)))
    with pytest.raises(SurrogateFormatError, match="pickle"):
        load_surrogate(only_pickle)
    both = write_nvidia_checkpoint(tmp_path / "both", "linear")
    (both / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(tripwire)))
    load_surrogate(both)
    assert not tripwire.exists()


def test_non_float_tensor_rejected(tmp_path):
    tensors = nvidia_tensors("linear")
    tensors["layers.0.bias"] = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(SurrogateFormatError, match="layers.0.bias"):
        load_surrogate(write_nvidia_checkpoint(tmp_path / "i", "linear", tensors=tensors))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_rejected_at_load(tmp_path, bad):
    tensors = nvidia_tensors("mlp")
    tensors["layers.1.2.weight"][0, 0] = bad
    with pytest.raises(SurrogateFormatError, match=r"layers\.1\.2\.weight.*1 NaN or infinite"):
        load_surrogate(write_nvidia_checkpoint(tmp_path / "nf", "mlp", tensors=tensors))


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    tensors = {k: v.bfloat16() for k, v in nvidia_tensors("mlp").items()}
    surrogate = load_surrogate(write_nvidia_checkpoint(tmp_path / "bf", "mlp", tensors=tensors))
    assert all(p.dtype == torch.float32 for p in surrogate.parameters())


# -- fitting ------------------------------------------------------------------------------------------------
def test_surrogate_config_kind():
    assert SurrogateConfig(model_type="kvzap", input_dim=4, output_dim=2, n_modules=1).kind == "linear"
    s = KVzapSurrogate(SurrogateConfig(model_type="kvzap", input_dim=4, output_dim=2, n_modules=2, hidden_dim=3))
    assert s.kind == "mlp" and s(1, torch.zeros(5, 4)).shape == (5, 2)


def test_safetensors_written_with_format_metadata(tmp_path, linear_dir):
    from safetensors import safe_open

    out = save_surrogate(load_surrogate(linear_dir), tmp_path / "out")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hidden=st.integers(1, 9), heads=st.integers(1, 4), layers=st.integers(1, 3),
       width=st.one_of(st.none(), st.integers(1, 5)), seed=st.integers(0, 1000))
def test_any_surrogate_round_trips(tmp_path_factory, hidden, heads, layers, width, seed):
    torch.manual_seed(seed)
    config = SurrogateConfig(model_type="kvzap", input_dim=hidden, output_dim=heads, n_modules=layers,
                             hidden_dim=width)
    surrogate = KVzapSurrogate(config)
    loaded = load_surrogate(save_surrogate(surrogate, tmp_path_factory.mktemp("rt")))
    assert loaded.config == config
    for name, tensor in surrogate.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
