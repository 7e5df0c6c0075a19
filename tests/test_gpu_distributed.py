"""FSDP2 on CUDA (one GPU, NCCL, world size 1): the fused Triton paths take the local shards."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.test_distributed import _fused_paths_body, _spawn

pytestmark = pytest.mark.gpu


def test_fsdp2_cuda_paths_take_dtensor_shards(tmp_path: Path) -> None:
    body = functools.partial(_fused_paths_body, device="cuda")
    (calls,) = _spawn(body, tmp_path, world=1, backend="nccl")
    assert all(count > 0 for count in calls.values()), calls
