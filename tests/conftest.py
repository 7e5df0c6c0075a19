"""Test-wide set-up: Triton's interpreter on CPU, a fresh Dynamo cache per test, the GPU marker.

``TRITON_INTERPRET`` is read when a Triton kernel is decorated, so it is set here, before any
test module imports the kernels.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_FASHION_MNIST = REPO_ROOT.parent / "shared" / "data" / "fashion-mnist"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries or counters leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
