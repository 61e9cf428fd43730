"""benchmarks/hf_cache.py --dry-run (what CI runs through benchmarks/gpu_check.sh --dry-run): it runs, prints one
RESULT line per adapter cache, labels its compressions, and calls transformers without deprecation warnings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_hf_cache_dry_run(tmp_path):
    out = tmp_path / "result.json"
    # FutureWarning is what transformers uses for deprecations (e.g. `past_key_values=` from 5.25 on): an error here.
    result = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", str(ROOT / "benchmarks" / "hf_cache.py"), "--dry-run",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "deprecated" not in result.stderr
    for name in ("unpruned", "compressed"):
        assert f"{name}/stock decode step:" in result.stdout
    assert "compression after prefill" in result.stdout and "decoded" in result.stdout
    data = json.loads(out.read_text())
    (run,) = data["results"]
    rows = run["rows"]
    assert set(rows) == {"stock", "unpruned", "compressed"}
    assert rows["stock"]["compression_prefill"] == rows["unpruned"]["compression_end"] == 0.0
    # The threshold is calibrated to the target (0.65) on the prefill's own scores.
    assert 0.5 < rows["compressed"]["compression_prefill"] < 0.8
    assert rows["compressed"]["kv_bytes_prefill"] < rows["stock"]["kv_bytes_prefill"]
    assert all(row["primary_ms"] > 0 and row["wall_ms"] > 0 for row in rows.values())
    for ratios in run["ratios"].values():
        assert ratios["block_min"] <= ratios["block_max"]
