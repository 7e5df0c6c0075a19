"""The quickstart end to end, in-process on scikit-learn's digits with a tiny budget (seconds)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from resu_compile.method.schedule import cycle_sparsities
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

    # Progress as it goes: a line per phase change of the RESU run (prune, RESU entry and commit
    # in every cycle), a line per cycle of the dense one.
    assert len(re.findall(r"RESU step +\d+/\d+ +cycle \d: ", printed)) == 3 * CYCLES
    assert len(re.findall(r"dense step +\d+/\d+ +dense +loss", printed)) == CYCLES
    assert printed.count("(commit)") == CYCLES

    # The per-cycle totals appear once, in one table; the cost of RESU is measured and explained.
    assert printed.count("Model totals, one row per commit:") == 1
    assert "budget used" not in printed
    assert "Why RESU costs more here" in printed
    phases = {row["phase"]: row for row in results["phases"]}
    assert set(phases) >= {"train", "stabilize", "resu", "all"}
    assert phases["all"]["steps"] == CYCLES * 20
    assert sum(row["steps"] for name, row in phases.items() if name != "all") == CYCLES * 20
    for row in phases.values():
        assert row["ratio"] == pytest.approx(row["resu_seconds"] / row["dense_seconds"])
    assert results["seconds"]["resu"] == pytest.approx(phases["all"]["resu_seconds"])
    assert [step for step, _ in results["curves"]["resu"]] == [
        step for step, _ in results["curves"]["dense"]
    ]
    assert results["dataset"] == "digits"
    assert results["settings"]["steps"] == CYCLES * 20

    # RESU ends exactly at the target: every layer at its share, int((1 - s) * N) in all.
    assert len(results["layers"]) == 3
    numels = [math.prod(layer["shape"]) for layer in results["layers"]]
    assert sum(layer["active"] for layer in results["layers"]) == int((1 - SPARSITY) * sum(numels))
    for layer, numel in zip(results["layers"], numels, strict=True):
        assert layer["active"] == layer["expected_active"], layer
        assert layer["sparsity"] == pytest.approx(1 - layer["active"] / numel)

    # One commit per cycle on the default (cubic) schedule, and every amnesty brought weights back.
    cycles = results["cycles"]
    targets = cycle_sparsities(SPARSITY, CYCLES, "cubic")
    assert [c["cycle"] for c in cycles] == list(range(CYCLES))
    for c in cycles:
        assert c["target"] == pytest.approx(targets[c["cycle"]])
        assert c["resurrected"] > 0, c
        assert c["reserved"] >= c["resurrected"] >= c["resurrected_trained"], c

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
def test_plot_writes_the_figure(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "figure.png"
    assert quickstart.main(["--cycles", "1", "--steps-per-cycle", "10", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.usefixtures("digits_only")
def test_plot_without_matplotlib_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="matplotlib"):
        quickstart.main(["--plot", str(tmp_path / "figure.png")])
    assert "AdamW steps" not in capsys.readouterr().out


@pytest.mark.usefixtures("digits_only")
def test_bad_budget_fails_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="phase_fractions"):
        quickstart.main(["--steps-per-cycle", "1"])
    assert "AdamW steps" not in capsys.readouterr().out
