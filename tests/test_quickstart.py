"""The quickstart end to end, in-process on scikit-learn's digits with a tiny budget (seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from resu_examples import datasets, quickstart

SPARSITY = 0.7
CYCLES = 3


@pytest.fixture
def digits_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide every Fashion-MNIST location so the quickstart falls back to the bundled digits."""
    pytest.importorskip("sklearn")
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(tmp_path / "no-such-data"))
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "no-system-dir")


@pytest.mark.usefixtures("digits_only")
def test_main_on_digits_writes_consistent_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "quickstart.json"
    threads = torch.get_num_threads()
    argv = ["--sparsity", str(SPARSITY), "--cycles", str(CYCLES), "--steps-per-cycle", "20"]
    assert quickstart.main([*argv, "--json", str(out)]) == 0
    assert torch.get_num_threads() == threads, "main must restore the caller's thread count"

    printed = capsys.readouterr().out
    assert "digits" in printed and "test accuracy" in printed and "Managed weights" in printed
    results = json.loads(out.read_text())
    assert results["dataset"] == "digits"
    assert results["settings"]["steps"] == CYCLES * 20

    # RESU ends exactly at the target: int((1 - s) * N) actives in every managed layer.
    assert len(results["layers"]) == 3
    for layer in results["layers"]:
        numel = math.prod(layer["shape"])
        assert layer["active"] == int((1 - SPARSITY) * numel), layer
        assert layer["sparsity"] == pytest.approx(1 - layer["active"] / numel)

    # One commit per cycle on the linear ramp, and every amnesty brought weights back.
    cycles = results["cycles"]
    assert [c["cycle"] for c in cycles] == list(range(CYCLES))
    for c in cycles:
        assert c["target"] == pytest.approx(SPARSITY * (c["cycle"] + 1) / CYCLES)
        assert c["resurrected"] > 0, c

    accuracy = results["accuracy"]
    assert set(accuracy) == {"dense", "pruned_no_recovery", "resu"}
    assert all(0.0 <= value <= 1.0 for value in accuracy.values()), accuracy


def test_prune_one_shot_keeps_exact_count_and_leaves_original() -> None:
    model = quickstart.build_mlp([64, 32, 10], seed=0)
    before = [p.clone() for p in model.parameters()]
    pruned = quickstart.prune_one_shot(model, SPARSITY)

    for original, weight in zip(before, model.parameters(), strict=True):
        assert torch.equal(original, weight)
    for source, module in zip(model.modules(), pruned.modules(), strict=True):
        if isinstance(module, torch.nn.Linear):
            kept = module.weight != 0
            assert int(kept.sum()) == int((1 - SPARSITY) * module.weight.numel())
            assert torch.equal(module.weight[kept], source.weight[kept])
            # The kept coordinates are the largest magnitudes of the trained weight.
            magnitude = source.weight.abs()
            assert magnitude[kept].min() >= magnitude[~kept].max()


def test_build_mlp_and_batches_are_seeded() -> None:
    first, second = quickstart.build_mlp([8, 4, 2], 3), quickstart.build_mlp([8, 4, 2], 3)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    batches = list(quickstart.minibatches(10, 4, steps=5, seed=1))
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    again = list(quickstart.minibatches(10, 4, steps=5, seed=1))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


@pytest.mark.usefixtures("digits_only")
def test_bad_budget_fails_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="phase_fractions"):
        quickstart.main(["--steps-per-cycle", "1"])
    assert "AdamW steps" not in capsys.readouterr().out
