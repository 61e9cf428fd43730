"""The launchers as users run them: a real SGLang HTTP server on 127.0.0.1 with ``--kv-policy window`` (through
SGLang's own ``python -m sglang.launch_server``) and ``--kv-policy kvzap_mlp`` (through ``kvpolicy serve``) on
CPU, tiny random Qwen3; one ``/generate`` each, pruned slots logged, clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.adapters.sglang.conftest import sglang_or_skip

sglang_or_skip()

READY_TIMEOUT_S = 180
PROMPT = list(range(10, 50))  # 40 tokens
NEW_TOKENS = 8
WINDOW = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _serve_once(tmp_path: Path, name: str, model: Path, launcher: list[str], policy_args: list[str]) -> tuple[dict, str]:
    """Start the launcher, wait until it answers, send one /generate, SIGTERM it; returns (reply, log)."""
    port = _free_port()
    log_path = tmp_path / f"{name}.log"
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", *launcher, *policy_args,
           "--model-path", str(model), "--device", "cpu", "--attention-backend", "torch_native",
           "--host", "127.0.0.1", "--port", str(port), "--mem-fraction-static", "0.05", "--max-total-tokens", "4096",
           "--skip-tokenizer-init", "--disable-cuda-graph", "--log-level", "info"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, \
                f"server not ready in {READY_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(base + "/health_generate", timeout=30) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1.0)
        reply = _post(base + "/generate", {"input_ids": PROMPT,
                                           "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0}},
                      timeout=120)
        time.sleep(2)  # idle: SGLang's strict pool check runs
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log_path.read_text()
    assert returncode == 0, f"exit status {returncode} after SIGTERM:\n{text[-4000:]}"
    return reply, text


@pytest.mark.slow
def test_launcher_serves_window_and_kvzap_mlp_over_http(tmp_path):
    from tests.adapters.sglang.live_engine_check import PRUNED_LOG, make_model, make_surrogate

    model = tmp_path / "tiny-qwen3"
    make_model(str(model))
    surrogate = tmp_path / "kvzap-mlp"
    make_surrogate(str(surrogate))
    # threshold 100 is above every score of the random surrogate: every token that leaves the window goes.
    runs = {
        "window": (["sglang.launch_server"],
                   ["--kv-policy", "window", "--kv-policy-config", json.dumps({"window": WINDOW})]),
        "kvzap_mlp": (["kvpolicy", "serve"],
                      ["--kv-policy", "kvzap_mlp", "--kv-policy-config",
                       json.dumps({"surrogate": str(surrogate), "threshold": 100.0, "window": WINDOW})]),
    }
    for name, (launcher, args) in runs.items():
        reply, log = _serve_once(tmp_path, name, model, launcher, args)
        assert len(reply["output_ids"]) == NEW_TOKENS, reply
        assert "added --disable-overlap-schedule" in log and "memory leak" not in log
        # the request that was answered: every forwarded token that left the window was pruned and freed
        forwarded = len(PROMPT) + NEW_TOKENS - 1
        finished = [tuple(int(g) for g in m.groups()) for m in PRUNED_LOG.finditer(log)]
        assert (forwarded - WINDOW, forwarded) in [(p, t) for p, t, _ in finished], (name, finished)
