"""The benchmark bookkeeping that runs without a GPU: merging overhead runs and rendering tables.

``benchmarks/overhead.py --merge`` and the transitions / kernels sections of
``benchmarks/render_results.py`` are exercised on small fake result dicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import overhead, render_results

ENV = {"device": "Fake GPU", "torch": "2.0", "triton": "3.0", "date": "2026-01-02T00:00:00+00:00"}


def _run(model: str, mode: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "mode": mode, **extra}


# overhead.py --merge


def test_merge_runs_replaces_same_pair_keeps_others_in_table_order():
    earlier = [
        _run("gpt2", "dense", ms=1.0),
        _run("gpt2", "resu", ms=2.0),
        _run("vit", "dense", ms=3.0),
    ]
    new = [_run("vit", "resu", ms=5.0), _run("gpt2", "resu", ms=4.0)]
    merged = overhead.merge_runs(earlier, new)
    assert [(r["model"], r["mode"], r["ms"]) for r in merged] == [
        ("gpt2", "dense", 1.0),
        ("gpt2", "resu", 4.0),  # the new run, not the earlier one
        ("vit", "dense", 3.0),
        ("vit", "resu", 5.0),
    ]
    assert overhead.merge_runs([], new) == [new[1], new[0]]  # gpt2 before vit
    assert overhead.merge_runs(earlier, []) == earlier


def _earlier_file(tmp_path: Path, **extra: Any) -> Path:
    path = tmp_path / "overhead.json"
    result = {
        **ENV,
        "sparsity": overhead.SPARSITY,
        "steps": 30,
        "runs": [_run("gpt2", "dense"), _run("gpt2", "resu", date="2026-01-01T00:00:00+00:00")],
        **extra,
    }
    path.write_text(json.dumps(result))
    return path


def test_load_earlier_backfills_dates_and_carries_commands(tmp_path):
    env = {**ENV, "date": "2026-01-03T00:00:00+00:00"}
    runs, commands = overhead.load_earlier(_earlier_file(tmp_path), env, steps=30)
    # a run without a date of its own gets its file's date; one with a date keeps it
    assert [r["date"] for r in runs] == [ENV["date"], "2026-01-01T00:00:00+00:00"]
    assert commands == ["python benchmarks/overhead.py"]  # nothing recorded: the default command

    path = _earlier_file(tmp_path, command="python benchmarks/overhead.py --models gpt2")
    assert overhead.load_earlier(path, env, 30)[1] == [
        "python benchmarks/overhead.py --models gpt2"
    ]
    chain = ["python benchmarks/overhead.py --models gpt2", "python benchmarks/overhead.py --x"]
    path = _earlier_file(tmp_path, command=chain[-1], commands=chain)
    assert overhead.load_earlier(path, env, 30)[1] == chain


@pytest.mark.parametrize(
    ("env_change", "steps", "word"),
    [({"device": "Other GPU"}, 30, "device"), ({"torch": "2.1"}, 30, "torch"), ({}, 10, "steps")],
)
def test_load_earlier_refuses_results_measured_otherwise(tmp_path, env_change, steps, word):
    with pytest.raises(SystemExit, match=word):
        overhead.load_earlier(_earlier_file(tmp_path), {**ENV, **env_change}, steps)


def test_overhead_provenance_names_every_command_and_the_date_span():
    result = {**ENV, "runs": [{"date": ENV["date"]}]}
    assert render_results._overhead_provenance(result).endswith("`python benchmarks/overhead.py`")
    merged = {
        **ENV,
        "command": "python benchmarks/overhead.py --models vit --merge o.json",
        "commands": [
            "python benchmarks/overhead.py --models gpt2",
            "python benchmarks/overhead.py --models vit --merge o.json",
        ],
        "runs": [{"date": "2026-01-01T00:00:00+00:00"}, {"date": ENV["date"]}],
    }
    line = render_results._overhead_provenance(merged)
    assert (
        "`python benchmarks/overhead.py --models gpt2`, then "
        "`python benchmarks/overhead.py --models vit --merge o.json`" in line
    )
    assert "from 2026-01-01T00:00:00+00:00 to 2026-01-02T00:00:00+00:00" in line


# render_results.py: transitions


def _transitions() -> dict[str, Any]:
    def row(name: str, ms_per_100m: float) -> dict[str, Any]:
        return {
            "transition": name,
            "ms": ms_per_100m * 0.85,
            "ms/100M": ms_per_100m,
            "first cycle ms/100M": 300.0,
            "kernel launches": 96,
            "host syncs": 2,
        }

    return {
        **ENV,
        "command": "python -m benchmarks.transitions",
        "managed_weights": 84934656,
        "weights": 48,
        "sparsity": 0.7,
        "cycles": [{}] * 7,
        "summary": [row("prune", 12.5), row("enter_resu", 20.0), row("commit", 20.5)],
    }


def _table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith(f"| {first_cell}")
    ]


def test_transitions_section_flags_the_target_per_row():
    text = render_results.transitions_section(_transitions())
    assert text.startswith("### Transitions in isolation (GPT-2-small's 48 managed weights)")
    assert (
        "Fake GPU, torch 2.0, triton 3.0" in text and "`python -m benchmarks.transitions`" in text
    )
    assert "84,934,656" in text and "20 ms per 100M" in text
    header = _table_rows(text, "transition")[0]
    assert header[-1] == "target met"
    met = {
        row[0]: row[-1]
        for name in ("prune", "enter_resu", "commit")
        for row in _table_rows(text, name)
    }
    assert met == {"prune": "yes", "enter_resu": "yes", "commit": "no"}  # <= 20 ms/100M meets it


def test_render_places_transitions_after_overhead_and_survives_missing_files(tmp_path):
    # no JSON at all: no crash, no performance section
    empty = render_results.render(tmp_path)
    assert "Graph-level overhead" not in empty and "Transitions" not in empty
    assert render_results.performance_sections(tmp_path) == ""
    # transitions alone still render, under the overhead heading
    (tmp_path / "transitions.json").write_text(json.dumps(_transitions()))
    alone = render_results.render(tmp_path)
    assert alone.index("## Graph-level overhead") < alone.index("### Transitions in isolation")
    assert "## Kernels" not in alone


# render_results.py: kernels


def test_kernels_section_renders_only_the_sections_the_json_holds():
    """An ``--only`` run leaves sections out (no crash); keys no section reads are ignored."""
    result = {
        **ENV,
        "topk": [{"method": "topk_bits", "n": 8, "k": 2, "ms": 0.5, "count error": 0.0}],
        "inline": [{"shape": "8x4x4", "variant": "dense"}],
    }
    text = render_results.kernels_section(result)
    assert text.startswith("### Top-k selection without sorting")
    assert "### Fused update kernels" not in text and "Inline" not in text
    assert _table_rows(text, "topk_bits") == [["topk_bits", "8", "2", "0.500", "0.00e+00"]]


def test_tuning_section_shows_every_candidate_and_marks_the_default():
    from benchmarks.render_results import tuning_section

    env = {"device": "GPU", "torch": "2", "triton": "3", "date": "d"}

    def row(block: int, warps: int, fusion: bool, default: bool, share: float) -> dict[str, Any]:
        return {
            "dtype": "bfloat16",
            "kernel": "masked AdamW",
            "BLOCK": block,
            "warps": warps,
            "elements/thread": block // (32 * warps),
            "fp fusion": fusion,
            "default": default,
            "ms": 0.1,
            "% of copy": share,
        }

    result = {
        **env,
        "shape": [4096, 4096],
        "copy_ceiling_GBps": 3000.0,
        "rows": [row(1024, 4, False, True, 93.04), row(4096, 8, False, False, 67.6)],
    }
    text = tuning_section(result)
    rows = _table_rows(text, "bfloat16")
    assert [r[-2:] for r in rows] == [["93.0", "yes"], ["67.6", "no"]]
    assert "python -m benchmarks.tune_updates" in text and "4096x4096" in text


# render_results.py: accuracy


def _accuracy_result(recovers: bool) -> dict[str, Any]:
    def cell(method: str, sparsity: float, mean: float, **extra: Any) -> dict[str, Any]:
        return {
            "sparsity": sparsity,
            "method": method,
            "mean": mean,
            "std": 0.1,
            "seeds": [0, 1],
            "resurrected_mean": 0.0,
            "resurrected_trained_mean": 0.0,
            "recovers": None,
            "worse_than_before_max": None,
            **extra,
        }

    summary = []
    for s in (0.7, 0.9):
        summary += [
            cell("dense", s, 1.8),
            cell("resu", s, 2.0, recovers=True, worse_than_before_max=-0.2),
            cell(
                "resu-no-resu-phase",
                s,
                2.5,
                recovers=recovers or s == 0.7,
                worse_than_before_max=0.5,
            ),
        ]
    return {
        **ENV,
        "task": "sotu-llama",
        "metric": "validation bits per byte",
        "higher_is_better": False,
        "command": "python -m benchmarks.accuracy --task sotu-llama",
        "steps": 2000,
        "pretrain_steps": 0,
        "batch_size": 32,
        "schedule_fraction": 0.8,
        "methods": {"resu": {"method": "resu"}, "resu-no-resu-phase": {"method": "gmp"}},
        "runs": [{"seed": 0, "trace": [{"step": 0}]}, {"seed": 1, "trace": [{"step": 0}]}],
        "summary": summary,
    }


def test_accuracy_section_shows_the_check_after_the_final_prune_and_the_ablations():
    text = render_results.accuracy_section(_accuracy_result(recovers=False))
    header = _table_rows(text, "method")[0]
    assert header == [
        "method", "70% sparsity", "90% sparsity", "after final prune (70%)",
        "after final prune (90%)", "resurrected (70%)", "resurrected (90%)",
    ]  # fmt: skip
    rows = {row[0]: row for row in _table_rows(text, "resu")}
    assert rows["resu"][1] == "2.000 ± 0.100"
    assert rows["resu"][3:5] == ["ok (-0.200)", "ok (-0.200)"]
    assert rows["resu-no-resu-phase"][3:5] == ["ok (+0.500)", "**worse** (+0.500)"]
    assert _table_rows(text, "dense")[0][3:5] == ["", ""]  # nothing pruned: nothing to check
    assert "1 of 4 checked cells are worse: `resu-no-resu-phase` at 90%" in text
    assert "`resu-no-resu-phase`: GMP pruning at the default RESU's steps" in text
    assert "accuracy-sotu-llama.png" in text
    passing = render_results.accuracy_section(_accuracy_result(recovers=True))
    assert "Every one of the 4 checked cells is ok." in passing


def test_accuracy_section_of_a_recovery_task_names_the_checkpoint():
    result = {**_accuracy_result(recovers=True), "task": "kjv-gpt-recover", "pretrain_steps": 1200}
    text = render_results.accuracy_section(result)
    assert "same dense checkpoint per seed (trained 1200 steps, once)" in text
    assert "`pruned-no-recovery` is the pretrained checkpoint pruned by magnitude" in text
    assert "One-shot prunes before the first step." in text
