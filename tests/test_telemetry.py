"""Telemetry over the history: per-layer rows, model totals, tables, and the plot script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resu_compile as resu
from resu_compile.views.telemetry import (
    TOTAL,
    counts_by_cycle,
    cycle_rows,
    history_from,
    render_history,
    sparsity_by_cycle,
    summary_rows,
)
from tests.zoo import ZOO_BY_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZES = {"a": 100, "b": 300}


# Two layers of 100 and 300 weights, three cycles. Cycle 2 is in the older format for layer "b"
# (no survivors / reserved / pruned_before), so its totals that need them are unknown.
RESU_HISTORY: list[dict] = [
    {"event": "prune", "cycle": 0, "step": 4, "target": 0.5, "layers": {"a": 0.5, "b": 0.5}},
    {"event": "resu", "cycle": 0, "step": 6, "layers": {"a": 50, "b": 150}},
    {
        "event": "commit",
        "cycle": 0,
        "step": 10,
        "budget": 0.3,
        "layers": {
            "a": {
                "target": 0.5,
                "sparsity": 0.5,
                "resurrected": 10,
                "resurrected_trained": 8,
                "resurrection_rate": 0.2,
                "churn": 20,
                "budget": 0.3,
                "survivors": 0,
                "reserved": 15,
                "pruned_before": 50,
            },
            "b": {
                "target": 0.5,
                "sparsity": 0.5,
                "resurrected": 30,
                "resurrected_trained": 30,
                "resurrection_rate": 0.2,
                "churn": 60,
                "budget": 0.3,
                "survivors": 0,
                "reserved": 45,
                "pruned_before": 150,
            },
        },
    },
    {"event": "prune", "cycle": 1, "step": 14, "target": 0.7, "layers": {"a": 0.6, "b": 0.8}},
    {"event": "resu", "cycle": 1, "step": 16, "layers": {"a": 60, "b": 240}},
    {
        "event": "commit",
        "cycle": 1,
        "step": 20,
        "budget": 0.2,
        "layers": {
            "a": {
                "target": 0.7,
                "sparsity": 0.6,
                "resurrected": 6,
                "resurrected_trained": 6,
                "resurrection_rate": 0.1,
                "churn": 12,
                "budget": 0.2,
                "survivors": 7,
                "reserved": 12,
                "pruned_before": 60,
            },
            "b": {
                "target": 0.7,
                "sparsity": 0.8,
                "resurrected": 12,
                "resurrected_trained": 10,
                "resurrection_rate": 0.05,
                "churn": 24,
                "budget": 0.2,
                "survivors": 20,
                "reserved": 36,
                "pruned_before": 240,
            },
        },
    },
    {"event": "prune", "cycle": 2, "step": 24, "target": 0.8, "layers": {"a": 0.7, "b": 0.9}},
    {
        "event": "commit",
        "cycle": 2,
        "step": 30,
        "budget": 0.1,
        "layers": {
            "a": {
                "target": 0.8,
                "sparsity": 0.7,
                "resurrected": 3,
                "resurrected_trained": 3,
                "resurrection_rate": 3 / 70,
                "churn": 6,
                "budget": 0.1,
                "survivors": 9,
                "reserved": 7,
                "pruned_before": 70,
            },
            "b": {
                "target": 0.8,
                "sparsity": 0.9,
                "resurrected": 9,
                "resurrected_trained": 9,
                "resurrection_rate": 9 / 270,
                "churn": 18,
                "budget": 0.1,
            },
        },
    },
    {"event": "pause", "cycle": 2, "step": 30},
]


def _row(rows: list[dict], cycle: int, layer: str) -> dict:
    (row,) = [r for r in rows if r["cycle"] == cycle and r["layer"] == layer]
    return row


def _table_rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")][2:]  # header, rule
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_cycle_rows_per_layer_values() -> None:
    rows = cycle_rows(RESU_HISTORY)
    assert [(r["cycle"], r["layer"]) for r in rows] == [
        (c, layer) for c in range(3) for layer in ("a", "b", TOTAL)
    ]
    a1 = _row(rows, 1, "a")
    assert a1["step"] == 20
    assert a1["target"] == 0.7
    assert a1["sparsity"] == 0.6
    assert a1["resurrected"] == 6
    assert a1["resurrection_rate"] == 0.1
    assert a1["churn"] == 12
    assert a1["survivors"] == 7
    assert a1["budget"] == 0.2
    assert a1["budget_used"] == pytest.approx(6 / 12)
    assert _row(rows, 0, "b")["budget_used"] == pytest.approx(30 / 45)


def test_cycle_rows_totals_weight_by_counts_and_sizes() -> None:
    mean = cycle_rows(RESU_HISTORY)
    sized = cycle_rows(RESU_HISTORY, layer_sizes=SIZES)

    t0 = _row(sized, 0, TOTAL)
    assert (t0["resurrected"], t0["churn"], t0["survivors"]) == (40, 80, 0)
    assert t0["resurrected_trained"] == 38
    assert t0["resurrection_rate"] == pytest.approx(40 / 200)
    assert t0["budget_used"] == pytest.approx(40 / 60)
    assert t0["budget"] == 0.3

    t1 = _row(sized, 1, TOTAL)
    assert (t1["resurrected"], t1["churn"], t1["survivors"]) == (18, 36, 27)
    assert (t1["reserved"], t1["pruned_before"]) == (48, 300)
    # Weighted by pruned_before (60 and 240), not the mean of the rates (0.075).
    assert t1["resurrection_rate"] == pytest.approx(18 / 300)
    assert t1["budget_used"] == pytest.approx(18 / 48)
    # Size-weighted: (0.6 * 100 + 0.8 * 300) / 400; unweighted mean without sizes.
    assert t1["sparsity"] == pytest.approx(0.75)
    assert t1["sparsity_weighting"] == "size"
    assert t1["target"] == pytest.approx(0.7)
    assert _row(mean, 1, TOTAL)["sparsity"] == pytest.approx(0.7)
    assert _row(mean, 1, TOTAL)["sparsity_weighting"] == "mean"


def test_missing_keys_are_unknown_not_zero() -> None:
    rows = cycle_rows(RESU_HISTORY, layer_sizes=SIZES)
    b2 = _row(rows, 2, "b")
    assert b2["survivors"] is None
    assert b2["reserved"] is None
    assert b2["pruned_before"] is None
    assert b2["budget_used"] is None
    assert b2["resurrected"] == 9
    total = _row(rows, 2, TOTAL)
    assert (total["resurrected"], total["churn"]) == (12, 24)
    assert total["survivors"] is None  # a partial sum (9) would understate it
    assert total["resurrection_rate"] is None
    assert total["budget_used"] is None
    assert total["sparsity"] == pytest.approx((0.7 * 100 + 0.9 * 300) / 400)
    # Only layer "a" has a size: the total falls back to the unweighted mean.
    partial = _row(cycle_rows(RESU_HISTORY, layer_sizes={"a": 100}), 2, TOTAL)
    assert partial["sparsity"] == pytest.approx(0.8)
    assert partial["sparsity_weighting"] == "mean"


def test_malformed_and_sparse_entries_never_crash() -> None:
    history = [
        {"event": "commit", "cycle": 0, "step": 1, "layers": {"a": {}, "b": None}},
        {"event": "commit", "cycle": 1},  # no layers at all
        {"event": "commit", "layers": {"a": {"resurrected": 2, "reserved": 0}}},  # no cycle
        {"event": "rigl"},
        {"event": "something-new", "cycle": 2, "step": 3, "layers": [1, 2]},
        {},
    ]
    rows = cycle_rows(history)
    assert [r["layer"] for r in rows] == ["a", "b", TOTAL, "a", TOTAL]
    assert all(r[k] is None for r in rows[:3] for k in ("sparsity", "resurrected", "churn"))
    assert rows[3]["budget_used"] is None  # nothing reserved: no fraction of it was used
    table = _table_rows(render_history(history))
    assert len(table) == 5
    assert table[0][3:] == ["-"] * 7
    totals = _table_rows(render_history(history, totals_only=True))
    assert [row[2] for row in totals] == [TOTAL, TOTAL]
    summary_rows(history)
    sparsity_by_cycle(history)
    counts_by_cycle(history)
    assert render_history([]) == "(no history yet)"


def test_render_history_commit_table() -> None:
    table = render_history(RESU_HISTORY, layer_sizes=SIZES)
    header = table.splitlines()[0]
    for column in (
        "cycle",
        "layer",
        "target",
        "sparsity",
        "resurrected",
        "resurrection rate",
        "churn",
        "survivors",
        "budget used",
    ):
        assert column in header
    rows = _table_rows(table)
    assert len(rows) == 9
    assert rows[4] == ["1", "20", "b", "0.7000", "0.8000", "12", "0.0500", "24", "20", "0.3333"]
    assert rows[5] == ["1", "20", TOTAL, "0.7000", "0.7500", "18", "0.0600", "36", "27", "0.3750"]
    assert rows[7][-4:] == ["0.0333", "18", "-", "-"]  # cycle 2, layer b: older format
    assert "unweighted mean" not in table

    unsized = render_history(RESU_HISTORY)
    assert "unweighted mean" in unsized
    totals = _table_rows(render_history(RESU_HISTORY, totals_only=True))
    assert [row[2] for row in totals] == [TOTAL] * 3
    assert [row[5] for row in totals] == ["40", "18", "12"]


RIGL_HISTORY: list[dict] = [
    {"event": "prune", "cycle": 0, "step": 2, "target": 0.5, "layers": {"a": 0.5, "b": 0.5}},
    {
        "event": "rigl",
        "cycle": 0,
        "step": 4,
        "fraction": 0.3,
        "layers": {
            "a": {"dropped": 5, "grown": 5, "sparsity": 0.5},
            "b": {"dropped": 10, "grown": 10, "sparsity": 0.5},
        },
    },
    {
        "event": "rigl",
        "cycle": 0,
        "step": 6,
        "fraction": 0.2,
        "layers": {
            "a": {"dropped": 3, "grown": 3, "sparsity": 0.5},
            "b": {"dropped": 6, "grown": 6, "sparsity": 0.5},
        },
    },
    {"event": "pause", "cycle": 0, "step": 6},
    {"event": "prune", "cycle": 1, "step": 8, "target": 0.8, "layers": {"a": 0.6, "b": 0.9}},
    {"event": "prune", "cycle": 1, "step": 9, "target": 0.85, "layers": {"a": 0.7, "b": 0.9}},
    {
        "event": "rigl",
        "cycle": 1,
        "step": 10,
        "fraction": 0.1,
        "layers": {"a": {"dropped": 2, "grown": 2, "sparsity": 0.7}, "b": {"sparsity": 0.9}},
    },
]


def test_summary_rows_for_runs_without_commits() -> None:
    assert cycle_rows(RIGL_HISTORY) == []
    rows = summary_rows(RIGL_HISTORY, layer_sizes=SIZES)
    assert len(rows) == 2
    first, second = rows
    assert (first["step"], first["prunes"], first["target"]) == (6, 1, 0.5)
    assert (first["rigl_updates"], first["dropped"], first["grown"]) == (2, 24, 24)
    assert first["paused"] == "yes"
    assert first["sparsity"] == pytest.approx(0.5)
    assert (second["step"], second["prunes"], second["target"]) == (10, 2, 0.85)
    assert second["rigl_updates"] == 1
    assert second["dropped"] is None  # layer "b" did not say
    assert second["paused"] == "no"
    assert second["sparsity"] == pytest.approx((0.7 * 100 + 0.9 * 300) / 400)
    assert summary_rows(RIGL_HISTORY)[1]["sparsity"] == pytest.approx(0.8)

    table = render_history(RIGL_HISTORY, layer_sizes=SIZES)
    assert "rigl updates" in table.splitlines()[0]
    assert _table_rows(table)[1] == ["1", "10", "2", "0.8500", "0.8500", "1", "-", "-", "no"]
    assert "unweighted mean" in render_history(RIGL_HISTORY)


def test_series_for_plots() -> None:
    assert sparsity_by_cycle(RESU_HISTORY) == {
        "a": {0: 0.5, 1: 0.6, 2: 0.7},
        "b": {0: 0.5, 1: 0.8, 2: 0.9},
    }
    assert counts_by_cycle(RESU_HISTORY) == {"a": {0: 10, 1: 6, 2: 3}, "b": {0: 30, 1: 12, 2: 9}}
    assert counts_by_cycle(RIGL_HISTORY, "rigl", "grown") == {"a": {0: 8, 1: 2}, "b": {0: 16}}
    # A gradual-pruning run: the last prune of a cycle wins.
    assert sparsity_by_cycle(RIGL_HISTORY)["a"] == {0: 0.5, 1: 0.7}


def test_history_from_accepts_list_or_state_dict() -> None:
    assert history_from(RESU_HISTORY) == RESU_HISTORY
    assert history_from({"format": 1, "history": RESU_HISTORY}) == RESU_HISTORY
    with pytest.raises(ValueError, match="no 'history' key"):
        history_from({"format": 1})
    with pytest.raises(ValueError, match="list of event dicts"):
        history_from({"history": "nope"})
    with pytest.raises(ValueError, match="non-dict entries"):
        history_from([1, 2])


def test_plot_script_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks.plot_history import main

    source = tmp_path / "state.json"
    source.write_text(json.dumps({"format": 1, "history": RESU_HISTORY}))
    out = tmp_path / "plots" / "history.png"
    assert main([str(source), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC

    # As a script, from another directory, on a run without commits, default output path.
    rigl = tmp_path / "rigl.json"
    rigl.write_text(json.dumps(RIGL_HISTORY))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "plot_history.py"), str(rigl)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rigl.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_script_without_matplotlib_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.plot_history import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    source = tmp_path / "history.json"
    source.write_text(json.dumps(RESU_HISTORY))
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[plot\]"'):
        main([str(source)])


def test_render_history_of_a_real_run_has_a_row_per_layer_per_cycle() -> None:
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    cycles = 2
    compiled = resu.compile(
        model, sparsity=0.6, cycles=cycles, steps_per_cycle=10, compiler="aot_eager"
    )
    controller = compiled.resu
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for step in range(cycles * 10):
        loss = entry.loss_fn(compiled(*entry.make_batch(step)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        controller.step(optimizer)
    assert controller.phase is resu.Phase.DONE
    names = sorted(controller.masks())
    assert names

    sizes = {w.name: w.numel for w in controller.state}
    history = json.loads(json.dumps(controller.history))  # JSON-serialisable as promised
    table = render_history(history, layer_sizes=sizes)
    rows = _table_rows(table)
    for cycle in range(cycles):
        layers = sorted(row[2] for row in rows if row[0] == str(cycle) and row[2] != TOTAL)
        assert layers == names
        assert [row[2] for row in rows if row[0] == str(cycle)].count(TOTAL) == 1

    totals = [r for r in cycle_rows(history, sizes) if r["layer"] == TOTAL]
    assert [t["resurrected"] for t in totals] == controller.resurrected_per_cycle()
    masks = controller.masks()
    active = sum(int(m.sum()) for m in masks.values())
    assert totals[-1]["sparsity"] == pytest.approx(1 - active / sum(sizes.values()))
