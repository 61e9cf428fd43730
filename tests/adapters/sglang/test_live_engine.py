"""Live pruning in a real SGLang engine (CPU, tiny random Qwen3), against an independent masked HF reference.

Two policies: a keys/values test policy (``every_third``) and the real ``kvzap_mlp`` (hidden states captured
by hooks on each layer's attention, random MLP surrogate saved in NVIDIA's layout).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.adapters.sglang.conftest import sglang_or_skip

sglang_or_skip()

SCRIPT = Path(__file__).with_name("live_engine_check.py")
# fp32 SGLang (torch_native attention) vs HF eager on CPU differ by ~1e-5 in logits; a random tiny model has
# near-ties, so "SGLang took the reference argmax" is checked up to this logit gap.
TIE = 1e-3


def run_script(tmp_path: Path, mode: str, chunk: int | None, extra_env: dict | None = None) -> tuple[dict, str]:
    """Run the engine script; returns its RESULT and its stderr (the scheduler's log)."""
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
           **(extra_env or {})}
    args = [sys.executable, str(SCRIPT), str(tmp_path), mode] + ([str(chunk)] if chunk else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=480, env=env, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"engine run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "memory leak" not in proc.stderr
    return json.loads(lines[-1][len("RESULT "):]), proc.stderr


def run_check(tmp_path: Path, mode: str, chunk: int | None) -> tuple[dict, list[tuple[int, int, int]]]:
    """Run the engine script; returns its RESULT and the ``(pruned, tokens, freed_so_far)`` of each finished
    request, read from the adapter's INFO log in the scheduler process."""
    from tests.adapters.sglang.live_engine_check import PRUNED_LOG

    result, stderr = run_script(tmp_path, mode, chunk)
    finished = [tuple(int(g) for g in m.groups()) for m in PRUNED_LOG.finditer(stderr)]
    return result, finished


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, chunk",
    [("every_third", None), ("kvzap_mlp", None), ("kvzap_mlp", 16)],
    ids=["every_third", "kvzap_mlp", "kvzap_mlp-chunked-prefill-16"],
)
def test_live_pruning_matches_masked_reference(tmp_path, mode, chunk):
    """``chunk``: SGLang's chunked_prefill_size; 16 splits every prompt (30–60 tokens) into chunks, and earlier
    chunks must be judged too (the reference prunes every token that left the window)."""
    result, finished = run_check(tmp_path, mode, chunk)
    assert result["alive"]
    for gaps in result["pruned_gaps"]:  # every generated token is the pruned reference's argmax (up to ties)
        assert max(gaps) <= TIE, gaps
    # ...and pruning really changed the computation: the unpruned model disagrees clearly somewhere.
    assert any(max(gaps) > 10 * TIE for gaps in result["full_gaps"])
    # The engine pruned exactly the tokens the reference pruned (per round: 3 prompts, then the alive check),
    expected = [tuple(e) for e in result["expected_pruned"]]
    engine = [(pruned, tokens) for pruned, tokens, _ in finished]
    assert sorted(engine[0:3]) == sorted(expected[0:3]) and sorted(engine[3:6]) == sorted(expected[3:6])
    assert engine[6] == (0, 4)
    assert sum(p for p, _ in expected) > 0.25 * sum(t for _, t in expected)  # real compression, not a no-op
    # ...and freed every pruned token's slot (each request's tokens were its own; the strict idle check above
    # also ran: allocator + tree + rows = capacity).
    assert finished[-1][2] == sum(p for p, _ in expected)


# The adapter's INFO lines, with the request id: one "retracted" line per retraction (SGLang releases the
# running request through cache_finished_req), one "finished" line when the request really finishes.
RETRACTED_LOG = re.compile(r"kvpolicy: request (\S+) retracted: (\d+) of (\d+) tokens pruned")
FINISHED_LOG = re.compile(r"kvpolicy: request (\S+) finished: (\d+) of (\d+) tokens pruned.*?(\d+) KV slots freed")
SGLANG_RETRACTIONS = re.compile(r"Testing retraction\. #retracted_reqs: (\d+)")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["every_third", "kvzap_mlp"])
def test_live_pruning_survives_retraction(tmp_path, mode):
    """SGLANG_TEST_RETRACT=1 makes the scheduler retract a decoding request every third forward
    (retract_decode -> release_kv_cache(is_insert=False) -> our cache_finished_req, then a re-prefill of
    origin_input_ids + output_ids). The re-prefill recomputes the first L tokens with full attention and
    judges them afresh, so the masked reference is re-run with a "prefill" of L tokens at that step."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.adapters.sglang.live_engine_check import (NEW_TOKENS, PROMPTS, WINDOW, MaskedReference,
                                                         every_third_pruned, kvzap_pruned)

    result, stderr = run_script(tmp_path, mode, None, {"SGLANG_TEST_RETRACT": "1",
                                                       "SGLANG_TEST_RETRACT_INTERVAL": "3"})
    assert result["alive"]
    rids, outputs = result["rids"], result["outputs"]
    assert all(len(generated) == NEW_TOKENS for generated in outputs)  # every request answered in full
    retractions = [(rid, int(p), int(n)) for rid, p, n in RETRACTED_LOG.findall(stderr)]
    # Retraction really happened, to our requests, and SGLang's count agrees with the adapter's.
    assert sum(int(n) for n in SGLANG_RETRACTIONS.findall(stderr)) == len(retractions) > 0
    assert any(rid in rids for rid, _, _ in retractions)
    reprefills: dict[str, list[int]] = {}
    for rid, _, logical in retractions:  # the last generated token was not forwarded: it is prefilled too
        reprefills.setdefault(rid, []).append(logical + 1)
    finished = {}
    for rid, pruned, tokens, freed in FINISHED_LOG.findall(stderr):
        assert rid not in finished
        finished[rid] = (int(pruned), int(tokens))
    last_freed = int(FINISHED_LOG.findall(stderr)[-1][3])

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-qwen3", attn_implementation="eager").eval()
    if mode == "every_third":
        pruned_of = every_third_pruned
    else:
        from kvpolicy.surrogate import load_surrogate

        surrogate = load_surrogate(str(tmp_path / "kvzap-mlp")).eval()
        pruned_of = kvzap_pruned(surrogate, result["policy"]["policy_config"]["threshold"])
    reference = MaskedReference(model, pruned_of)
    total = 0
    for rid, prompt, generated in zip(rids, PROMPTS + PROMPTS, outputs):
        gaps, pruned = reference.run(prompt, generated, tuple(reprefills.get(rid, ())))
        assert max(gaps) <= TIE, (rid, reprefills.get(rid), gaps)
        forwarded = len(prompt) + len(generated) - 1
        expected = (sum(pruned[:forwarded - WINDOW]), forwarded)
        assert finished[rid] == expected, (rid, reprefills.get(rid))
        if mode == "every_third":  # positional: the same as without retraction
            assert expected[0] == sum(1 for p in range(forwarded - WINDOW) if p % 3)
        total += expected[0]
    # Every pruned slot was freed: those pruned before each retraction, then again after the re-prefill
    # (the strict idle check also ran: allocator + tree + rows = capacity).
    assert last_freed == total + sum(p for _, p, _ in retractions)
    assert total > 0.25 * sum(len(p) + len(g) - 1 for p, g in zip(PROMPTS + PROMPTS, outputs))
