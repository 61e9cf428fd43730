"""Suite-wide setup. Keep this minimal: it is shared by every test directory."""

from __future__ import annotations

import os

# Triton reads this when it is first imported, so it must be set before any test module imports triton.
# It makes Triton kernels run on CPU tensors through the interpreter; on a GPU machine export
# TRITON_INTERPRET=0 to compile them for real.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
