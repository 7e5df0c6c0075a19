"""A full RESU schedule on real data: Fashion-MNIST (from $RESU_DATA or ../shared/data in CI)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from resu_examples import datasets, quickstart
from tests.conftest import SHARED_FASHION_MNIST

SPARSITY = 0.7
CYCLES = 3


def _fashion_mnist() -> Path:
    """The data folder, or a skip saying where it was looked for (a clone has no ../shared)."""
    try:
        found = datasets.find_fashion_mnist(
            os.environ.get(datasets.DATA_ENV_VAR) or SHARED_FASHION_MNIST
        )
    except FileNotFoundError as exc:  # an explicit folder without the files
        pytest.skip(f"no Fashion-MNIST ($RESU_DATA or ../shared/data/fashion-mnist): {exc}")
    assert found is not None  # an explicit folder is found or raises
    return found


def test_full_schedule_on_fashion_mnist_resurrects_and_beats_pruning_without_recovery(
    tmp_path: Path,
) -> None:
    data_dir = _fashion_mnist()
    out = tmp_path / "run.json"
    argv = ["--data", str(data_dir), "--sparsity", str(SPARSITY), "--cycles", str(CYCLES)]
    assert quickstart.main([*argv, "--steps-per-cycle", "200", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["dataset"] == "fashion-mnist"
    assert len(results["cycles"]) == CYCLES
    assert all(cycle["resurrected"] > 0 for cycle in results["cycles"]), results["cycles"]
    numel = sum(math.prod(layer["shape"]) for layer in results["layers"])
    assert sum(layer["active"] for layer in results["layers"]) == int((1 - SPARSITY) * numel)
    for layer in results["layers"]:
        assert layer["active"] == layer["expected_active"], layer
    accuracy = results["accuracy"]
    assert accuracy["resu"] > accuracy["pruned_no_recovery"], accuracy
