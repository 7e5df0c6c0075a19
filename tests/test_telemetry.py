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


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Every markdown table of ``text`` by the title line above it, as rows keyed by header."""
    tables: dict[str, list[dict[str, str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            title = lines[i - 1] if i else ""
            end = next((j for j, row in enumerate(lines[i:]) if not row.startswith("|")), None)
            block = lines[i : i + end] if end is not None else lines[i:]
            header = _cells(block[0])
            tables[title] = [dict(zip(header, _cells(row), strict=True)) for row in block[2:]]
    return tables


def _legend(text: str) -> dict[str, str]:
    """The lines ``- header: meaning`` under the tables, joined with their continuation lines."""
    legend: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("- "):
            current, _, meaning = line[2:].partition(": ")
            legend[current] = meaning
        elif line.startswith("  ") and current is not None:
            legend[current] += " " + line.strip()
        else:
            current = None
    return legend


TOTALS = "Model totals, one row per commit:"
LAYERS = "Per layer, one row per layer and commit:"


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
    assert (a1["reserved"], a1["pruned_before"], a1["resurrected_trained"]) == (12, 60, 6)


def test_cycle_rows_totals_weight_by_counts_and_sizes() -> None:
    mean = cycle_rows(RESU_HISTORY)
    sized = cycle_rows(RESU_HISTORY, layer_sizes=SIZES)

    t0 = _row(sized, 0, TOTAL)
    assert (t0["resurrected"], t0["churn"], t0["survivors"]) == (40, 80, 0)
    assert t0["resurrected_trained"] == 38
    assert t0["resurrection_rate"] == pytest.approx(40 / 200)
    assert t0["reserved"] == 60
    assert t0["budget"] == 0.3

    t1 = _row(sized, 1, TOTAL)
    assert (t1["resurrected"], t1["churn"], t1["survivors"]) == (18, 36, 27)
    assert (t1["reserved"], t1["pruned_before"]) == (48, 300)
    # Weighted by pruned_before (60 and 240), not the mean of the rates (0.075).
    assert t1["resurrection_rate"] == pytest.approx(18 / 300)
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
    assert b2["resurrected"] == 9
    total = _row(rows, 2, TOTAL)
    assert (total["resurrected"], total["churn"]) == (12, 24)
    assert total["survivors"] is None  # a partial sum (9) would understate it
    assert total["resurrection_rate"] is None
    assert total["reserved"] is None
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
    assert rows[3]["reserved"] == 0
    tables = _tables(render_history(history))
    assert len(tables[TOTALS]) == 2 and len(tables[LAYERS]) == 3
    first = tables[LAYERS][0]
    assert (first.pop("cycle"), first.pop("layer")) == ("0", "a")
    assert set(first.values()) == {"-"}
    assert set(_tables(render_history(history, totals_only=True))) == {TOTALS}
    summary_rows(history)
    sparsity_by_cycle(history)
    counts_by_cycle(history)
    assert render_history([]) == "(no history yet)"


def _shown(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def test_render_history_one_table_per_subject_each_column_explained_once() -> None:
    text = render_history(RESU_HISTORY, layer_sizes=SIZES)
    tables = _tables(text)
    assert set(tables) == {TOTALS, LAYERS}
    rows = cycle_rows(RESU_HISTORY, layer_sizes=SIZES)
    totals = [r for r in rows if r["layer"] == TOTAL]
    layers = [r for r in rows if r["layer"] != TOTAL]
    assert len(tables[TOTALS]) == len(totals) == 3
    assert len(tables[LAYERS]) == len(layers) == 6
    for shown, row in zip(tables[TOTALS], totals, strict=True):
        assert shown["cycle"] == str(row["cycle"]) and shown["step"] == str(row["step"])
        assert shown["budget"] == _shown(row["budget"], ".4f")
        assert shown["sparsity"] == _shown(row["sparsity"], ".4f")
        assert shown["resurrected"] == _shown(row["resurrected"], "d")
        assert shown["trained"] == _shown(row["resurrected_trained"], "d")
        assert shown["reserved"] == _shown(row["reserved"], "d")
        assert shown["resurrection rate"] == _shown(row["resurrection_rate"], ".4f")
        assert shown["survivors"] == _shown(row["survivors"], "d")
    for shown, row in zip(tables[LAYERS], layers, strict=True):
        assert (shown["cycle"], shown["layer"]) == (str(row["cycle"]), row["layer"])
        assert shown["churn"] == _shown(row["churn"], "d")
        assert shown["survivors"] == _shown(row["survivors"], "d")
    # The commit's own numbers (step, budget) are in the totals only: no data shown twice.
    assert "step" not in tables[LAYERS][0] and "budget" not in tables[LAYERS][0]
    # Every header of either table is explained exactly once, in a line of its own.
    headers = {h for table in tables.values() for h in table[0]}
    legend = _legend(text)
    assert set(legend) == headers
    assert all(text.count(f"- {header}: ") == 1 for header in headers)
    assert "budget used" not in text  # resurrected / reserved: 1.0 whenever candidates suffice
    assert "unweighted mean" not in text

    assert "unweighted mean" in render_history(RESU_HISTORY)
    only = render_history(RESU_HISTORY, totals_only=True)
    assert set(_tables(only)) == {TOTALS}
    assert set(_legend(only)) == set(_tables(only)[TOTALS][0])
    assert [row["resurrected"] for row in _tables(only)[TOTALS]] == ["40", "18", "12"]


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

    text = render_history(RIGL_HISTORY, layer_sizes=SIZES)
    (table,) = _tables(text).values()
    assert [row["cycle"] for row in table] == ["0", "1"]
    assert table[1] == {
        "cycle": "1",
        "step": "10",
        "prunes": "2",
        "target": "0.8500",
        "sparsity": format(second["sparsity"], ".4f"),
        "rigl updates": "1",
        "dropped": "-",
        "grown": "-",
        "paused": "no",
    }
    assert set(_legend(text)) == set(table[0])
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
    from resu_examples.plot_history import main

    # A quickstart --json file: its curves add the training-loss panel.
    source = tmp_path / "run.json"
    curves = {"dense": [[1, 2.3], [2, 1.9]], "resu": [[1, 2.3], [2, 2.0]]}
    source.write_text(json.dumps({"history": RESU_HISTORY, "curves": curves}))
    out = tmp_path / "plots" / "history.png"
    assert main([str(source), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC

    # As a module of the installed package, from another directory, on a run without commits,
    # default output path.
    rigl = tmp_path / "rigl.json"
    rigl.write_text(json.dumps(RIGL_HISTORY))
    result = subprocess.run(
        [sys.executable, "-m", "resu_examples.plot_history", str(rigl)],
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
    from resu_examples.plot_history import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    source = tmp_path / "history.json"
    source.write_text(json.dumps(RESU_HISTORY))
    with pytest.raises(SystemExit, match=r'pip install "resu-compile\[plot\]"'):
        main([str(source)])
    assert not source.with_suffix(".png").exists()


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
    tables = _tables(render_history(history, layer_sizes=sizes))
    for cycle in range(cycles):
        layers = sorted(row["layer"] for row in tables[LAYERS] if row["cycle"] == str(cycle))
        assert layers == names
        assert [row["cycle"] for row in tables[TOTALS]].count(str(cycle)) == 1

    totals = [r for r in cycle_rows(history, sizes) if r["layer"] == TOTAL]
    assert [t["resurrected"] for t in totals] == controller.resurrected_per_cycle()
    masks = controller.masks()
    active = sum(int(m.sum()) for m in masks.values())
    assert totals[-1]["sparsity"] == pytest.approx(1 - active / sum(sizes.values()))
