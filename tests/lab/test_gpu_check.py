"""benchmarks/gpu_check.sh --dry-run: the GPU check's wiring on CPU (tiny sizes, torch references), every section.

The script is what runs when a GPU is lent; this keeps it working between loans.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_section(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "KVP_STAGE": str(tmp_path / "stage")}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "FAILED" not in output
    for section in ("a-compaction", "b-", "c-", "d-"):
        assert section in output, f"section {section!r} missing:\n{output[-4000:]}"
    assert output.count("RESULT") >= 3, output[-4000:]
