"""Live pruning in a real SGLang engine (CPU, tiny random Qwen3), against an independent masked HF reference.

Two policies: a keys/values test policy (``every_third``) and the real ``kvzap_mlp`` (hidden states captured
by hooks on each layer's attention, random MLP surrogate saved in NVIDIA's layout).
"""

from __future__ import annotations

import json
import os
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


def run_check(tmp_path: Path, mode: str, chunk: int | None) -> tuple[dict, list[tuple[int, int, int]]]:
    """Run the engine script; returns its RESULT and the ``(pruned, tokens, freed_so_far)`` of each finished
    request, read from the adapter's INFO log in the scheduler process."""
    from tests.adapters.sglang.live_engine_check import PRUNED_LOG

    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, str(SCRIPT), str(tmp_path), mode] + ([str(chunk)] if chunk else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=480, env=env, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"engine run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "memory leak" not in proc.stderr
    finished = [tuple(int(g) for g in m.groups()) for m in PRUNED_LOG.finditer(proc.stderr)]
    return json.loads(lines[-1][len("RESULT "):]), finished


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
