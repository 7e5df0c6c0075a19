"""The accuracy benchmark, CPU-sized: RESU resurrects weights and beats pruning without recovery.

Runs ``benchmarks/accuracy.py``'s own planning, training, evaluation and summary on real
Fashion-MNIST (from $RESU_DATA or ../shared/data), with a smaller MLP (784-256-256-10) and 1000
steps of batch 128 instead of the GPU task's 784-1024-1024-10 and 5000 steps of batch 256.
About 20 s on one CPU core.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from benchmarks import accuracy
from benchmarks.accuracy_tasks import TASKS
from resu_examples import datasets
from tests.conftest import SHARED_FASHION_MNIST

SPARSITY = 0.9
TASK = dataclasses.replace(
    TASKS["fmnist-mlp"], model_args={"hidden": (256, 256)}, steps=1000, batch_size=128
)


def _fashion_mnist() -> Path:
    try:
        found = datasets.find_fashion_mnist(
            os.environ.get(datasets.DATA_ENV_VAR) or SHARED_FASHION_MNIST
        )
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST not found ($RESU_DATA or ../shared/data/fashion-mnist): {exc}")
    if found is None:
        pytest.skip("Fashion-MNIST not found ($RESU_DATA or ../shared/data/fashion-mnist)")
    return found


def test_resu_resurrects_and_beats_pruning_without_recovery_on_held_out_data() -> None:
    data_dir = _fashion_mnist()
    runs = accuracy.plan(TASK, ["dense", "resu-random"], [SPARSITY], seeds=[0])
    records = accuracy.execute(
        runs, device="cpu", compiler="aot_eager", data_dir=str(data_dir), threads=1, log=print
    )
    errors = [r["error"] for r in records if "error" in r]
    assert not errors, "\n".join(errors)
    assert all(r["steps"] == TASK.steps for r in records)

    rows = {row["method"]: row for row in accuracy.summarize(TASK, records, [SPARSITY])}
    resu, no_recovery = rows["resu-random"], rows[accuracy.NO_RECOVERY]
    assert resu["resurrected_mean"] > 0, resu
    assert resu["actual_sparsity_mean"] == pytest.approx(SPARSITY, abs=1e-3), resu
    assert rows["dense"]["actual_sparsity_mean"] == 0.0
    # Held-out (test-set) accuracy in percent: RESU, trained at the same sparsity, against the
    # trained dense model pruned to it by magnitude with no further training.
    assert resu["mean"] > no_recovery["mean"], (resu, no_recovery)
