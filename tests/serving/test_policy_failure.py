"""A policy that fails at run time fails its request, not the server.

A KVzap-MLP surrogate whose weights are finite (so it loads) but whose second layer mixes +1e30 and -1e30
returns NaN for every token (inf - inf). The request is finished with an error naming the policy and the layer;
the server keeps serving, nothing leaks (SGLang's strict idle check is on), and a surrogate with NaN weights is
refused before the server starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error

import pytest

from tests.serving.conftest import sglang_or_skip

sglang_or_skip()

import torch  # noqa: E402

from kvpolicy.lab.serve_bench import PolicyRun, Server  # noqa: E402
from kvpolicy.lab.testbed import MODEL_DIR  # noqa: E402
from kvpolicy.surrogate import KVzapSurrogate, SurrogateConfig, save_surrogate  # noqa: E402

_CONFIG = json.loads((MODEL_DIR / "config.json").read_text())


def _surrogate(path, second_layer_weight: float):
    surrogate = KVzapSurrogate(SurrogateConfig(model_type="kvzap", input_dim=_CONFIG["hidden_size"],
                                               output_dim=_CONFIG["num_key_value_heads"],
                                               n_modules=_CONFIG["num_hidden_layers"], hidden_dim=16))
    with torch.no_grad():
        for name, param in surrogate.named_parameters():
            if name.endswith("0.weight"):
                param.fill_(1e30)
            elif name.endswith("2.weight"):
                param.copy_(torch.tensor([second_layer_weight, -second_layer_weight]).repeat(param.numel() // 2)
                            .view_as(param))
    save_surrogate(surrogate, path)
    return path


def _post(server, body):
    try:
        return json.loads(server.post_json("/generate", body, timeout=60))
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode(errors="replace")}


@pytest.mark.slow
def test_nan_scores_fail_the_request_and_the_server_keeps_serving(tmp_path):
    surrogate = _surrogate(tmp_path / "nan-mlp", 1e30)
    run = PolicyRun("kvzap_mlp", "kvzap_mlp", {"surrogate": str(surrogate), "threshold": -2, "window": 4})
    # No warm-up request: it would fail like every request, and SGLang stops a server whose warm-up failed.
    server = Server(MODEL_DIR, run, tmp_path / "server.log", max_total_tokens=1024, python=sys.executable,
                    extra_args=["--skip-server-warmup"])
    with server:
        prompt = list(range(5, 69))
        for _ in range(2):
            reply = _post(server, {"input_ids": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
            text = json.dumps(reply)
            assert "returned NaN scores" in text and "kvzap_mlp" in text, text
        assert server.alive()
        assert server.load()["num_used_tokens"] == 0
    assert server.exit_code == 0, server.log_tail()
    log = server.log_text()
    assert "returned NaN scores (layer 0)" in log
    assert "memory leak" not in log and "Scheduler hit an exception" not in log


def test_a_surrogate_with_nan_weights_is_refused_before_the_server_starts(tmp_path):
    surrogate = _surrogate(tmp_path / "nan-weights", float("nan"))
    done = subprocess.run(
        [sys.executable, "-m", "kvpolicy.adapters.sglang.launch", "--model-path", str(MODEL_DIR), "--device", "cpu",
         "--kv-policy", "kvzap_mlp", "--kv-policy-config", json.dumps({"surrogate": str(surrogate)})],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "kvpolicy: refused" in done.stderr and "NaN or infinite" in done.stderr
