"""Render benchmarks/RESULTS.md and the README's performance and accuracy sections from the JSON.

Numbers are never typed by hand: this script is the only writer of both. Usage:

    python benchmarks/render_results.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
README_START = "<!-- performance:start -->"
README_END = "<!-- performance:end -->"
ACCURACY_START = "<!-- accuracy:start -->"
ACCURACY_END = "<!-- accuracy:end -->"
# Table order; other tasks follow.
ACCURACY_TASKS = (
    "fmnist-mlp",
    "fmnist-vit",
    "fmnist-cnn",
    "kjv-gpt",
    "sotu-llama",
    "kjv-gpt-recover",
)
#: What the ablation labels of benchmarks/accuracy.py leave out of the default RESU.
ACCURACY_ABLATIONS = {
    "resu-no-resu-phase": "GMP pruning at the default RESU's steps to its sparsities (its cycles, "
    "schedule and phase split) with no RESU phase: no theta, no amnesty",
    "resu-no-amnesty": "the default RESU with amnesty=False (the commit merges all theta)",
}
#: Labels whose options are the baselines' own, not listed per table.
BASELINE_LABELS = ("dense", "oneshot", "gmp", "rigl")
TRANSITION_TARGET_MS_PER_100M = 20.0  # the mask transitions' budget per 100M managed weights
ACCURACY_NOT_MEASURED = (
    "Not measured yet: run `python -m benchmarks.accuracy --task TASK` on the GPU machine "
    "(tasks: " + ", ".join(f"`{t}`" for t in ACCURACY_TASKS) + "), then "
    "`python benchmarks/render_results.py`."
)


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _provenance(result: dict[str, Any], command: str | Sequence[str]) -> str:
    """Device, versions, date and the command line(s), in the order they ran."""
    device = result.get("device") or result.get("gpu")
    commands = [command] if isinstance(command, str) else list(command)
    return (
        f"{device}, torch {result['torch']}, triton {result['triton']}, {result['date']}; "
        + ", then ".join(f"`{c}`" for c in commands)
    )


def _overhead_provenance(result: dict[str, Any]) -> str:
    """The provenance line; a result merged from several calls (``--merge``) names them all and
    the span of its runs' dates."""
    commands = result.get("commands") or [result.get("command") or "python benchmarks/overhead.py"]
    line = _provenance(result, commands)
    dates = sorted({run["date"] for run in result.get("runs", []) if run.get("date")})
    if len(dates) > 1:
        line += f" (runs measured from {dates[0]} to {dates[-1]})"
    return line


def overhead_section(result: dict[str, Any]) -> str:
    rows = [
        {
            "model": r["model"],
            "mode": r["mode"],
            "phase": r["phase"],
            "ms": f"{r['ms']:.2f}",
            "x dense (same process)": _ratio(r.get("x dense (same process)")),
            "quartiles": _quartiles(r.get("same-process quartiles")),
            "x dense (separate runs)": _ratio(r["time x dense"]),
            "peak MiB": f"{r['peak MiB']:.0f}",
            "dense MiB": f"{r['dense MiB']:.0f}",
            "memory target met": _flag(r["memory within target"]),
        }
        for r in result["summary"]
    ]
    compile_rows = [
        {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()}
        for row in result["compile"]
    ]
    return "\n\n".join(
        [
            "### Step time and memory per phase (GPT-2-small decoder, ViT-B encoder; bf16 autocast, "
            f"fused AdamW, sparsity {result['sparsity']})",
            _overhead_provenance(result),
            "`x dense (same process)` alternates blocks of steps with a dense `torch.compile` model "
            "built in the same process (the fair ratio): the median of the per-round ratios, with "
            "their quartiles, which show how far the host's speed moved it. `x dense (separate "
            "runs)` divides by a dense run in its own process, which drifts by several percent. "
            "Memory target: dense peak + 1% + 2 bits per managed weight.",
            tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True),
            "### Compile, recompiles and transitions",
            tabulate(compile_rows, headers="keys", tablefmt="github", disable_numparse=True),
        ]
    )


def kernels_section(result: dict[str, Any]) -> str:
    """Every section the kernels JSON holds (``--only`` runs may leave some out)."""
    parts = []
    if result.get("updates"):
        updates = [
            {
                "kernel": r["kernel"],
                "shape": r["shape"],
                "dtype": r["dtype"],
                "ms": f"{r['ms']:.4f}",
                "GB/s": "" if r.get("GB/s") is None else f"{r['GB/s']:.0f}",
                "% of copy": "" if r.get("% of copy") is None else f"{r['% of copy']:.1f}",
            }
            for r in result["updates"]
        ]
        parts += [
            "### Fused update kernels",
            _provenance(
                result.get("provenance", {}).get("updates", result),
                "python -m benchmarks.kernels --only updates",
            ),
            f"Copy ceiling measured in the same run: {result['copy_ceiling_GBps']:.0f} GB/s "
            "(read + write).",
            tabulate(updates, headers="keys", tablefmt="github", disable_numparse=True),
        ]
    if result.get("topk"):
        topk = [
            {
                "method": r["method"],
                "n": r["n"],
                "k": r["k"],
                "ms": f"{r['ms']:.3f}",
                "count error": f"{r['count error']:.2e}",
            }
            for r in result["topk"]
        ]
        parts += [
            "### Top-k selection without sorting",
            tabulate(topk, headers="keys", tablefmt="github", disable_numparse=True),
        ]
    if result.get("multi_tensor"):
        multi = [
            {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()}
            for row in result["multi_tensor"]
        ]
        parts += [
            "### One launch for all managed weights (GPT-2-small shapes)",
            tabulate(multi, headers="keys", tablefmt="github", disable_numparse=True),
        ]
    if result.get("column_norms"):
        norms = [
            {**row, "ms": f"{row['ms']:.4f}", "GB/s": f"{row['GB/s']:.0f}"}
            for row in result["column_norms"]
        ]
        parts += [
            "### Calibrate variant: column sums of squares (bf16 activations)",
            _provenance(
                result.get("provenance", {}).get("column_norms", result),
                "python -m benchmarks.kernels --only column_norms",
            ),
            tabulate(norms, headers="keys", tablefmt="github", disable_numparse=True),
        ]
    return "\n\n".join(parts)


def transitions_section(result: dict[str, Any]) -> str:
    """Prune / RESU entry / commit over GPT-2-small's managed weights, against the target."""
    rows = [
        {
            "transition": r["transition"],
            "ms": f"{r['ms']:.2f}",
            "ms/100M": f"{r['ms/100M']:.1f}",
            "first cycle ms/100M": f"{r['first cycle ms/100M']:.1f}",
            "kernel launches": r["kernel launches"],
            "host syncs": r["host syncs"],
            "target met": _flag(r["ms/100M"] <= TRANSITION_TARGET_MS_PER_100M),
        }
        for r in result["summary"]
    ]
    weights = result["weights"]
    subject = (
        "GPT-2-small's 48 managed weights"
        if weights == 48
        else f"{weights} GPT-2-small-shaped managed weights"
    )
    cycles = len(result.get("cycles", []))
    return "\n\n".join(
        [
            f"### Transitions in isolation ({subject})",
            _provenance(result, result.get("command") or "python -m benchmarks.transitions"),
            f"{weights} managed weights, {result['managed_weights']:,} parameters in all (fp32), "
            f"sparsity {result['sparsity']}, under a manual controller in the default "
            "configuration, no graph involved. `ms`: median of "
            f"{cycles} cycles after a first one (`first cycle` also pays CUDA's lazy kernel "
            "loading and Triton's compilation of the transition kernels, once per process and "
            "cache); kernel launches and host syncs: one profiled cycle. Target: "
            f"{TRANSITION_TARGET_MS_PER_100M:g} ms per 100M managed weights (`target met` "
            "compares `ms/100M`).",
            tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True),
        ]
    )


def accuracy_results(results: Path) -> list[dict[str, Any]]:
    """Every ``accuracy-<study>.json`` (a task's study, or another study of a task, such as
    ``accuracy-kjv-gpt-24.json``), in :data:`ACCURACY_TASKS` order, each with its ``study``
    name from the file name."""
    found = [
        {**json.loads(p.read_text()), "study": p.stem.removeprefix("accuracy-")}
        for p in sorted(results.glob("accuracy-*.json"))
    ]
    order = {task: i for i, task in enumerate(ACCURACY_TASKS)}
    return sorted(found, key=lambda r: (order.get(r["task"], len(order)), r["study"]))


def accuracy_section(result: dict[str, Any]) -> str:
    """One task: rows = method, columns = sparsity ("mean ± std" over seeds), the check against
    the value just before the final prune (where recorded), resurrected counts."""
    perplexity = not result.get("higher_is_better", True)
    digits = 3 if perplexity else 2
    sparsities = sorted({row["sparsity"] for row in result["summary"]})
    methods = list(dict.fromkeys(row["method"] for row in result["summary"]))
    cells = {(row["method"], row["sparsity"]): row for row in result["summary"]}
    checked = any(row.get("recovers") is not None for row in result["summary"])
    rows = []
    for method in methods:
        row = {"method": method}
        for s in sparsities:
            cell = cells.get((method, s))
            row[f"{s:.0%} sparsity"] = "" if cell is None else _mean_std(cell, digits)
        if checked:
            for s in sparsities:
                cell = cells.get((method, s))
                row[f"after final prune ({s:.0%})"] = _after_final_prune(cell, digits)
        for s in sparsities:
            cell = cells.get((method, s))
            resurrected = cell is not None and (
                method.startswith("resu") or cell["resurrected_mean"] > 0
            )
            text = ""
            if resurrected:
                text = f"{cell['resurrected_mean']:,.0f}"
                if "resurrected_trained_mean" in cell:
                    text += f" ({cell['resurrected_trained_mean']:,.0f})"
            row[f"resurrected ({s:.0%})"] = text
        rows.append(row)
    seeds = sorted({run["seed"] for run in result["runs"]})
    optimizer = result.get("optimizer", {})
    start = "every trained method"
    if result.get("pretrain_steps"):
        start = (
            f"every method, each starting from the same dense checkpoint per seed (trained "
            f"{result['pretrain_steps']} steps, once)"
        )
    notes = [
        f"{result['steps']} optimizer steps of batch {result['batch_size']} for {start} (AdamW, "
        f"lr {optimizer.get('lr')}, weight decay {optimizer.get('weight_decay')}, "
        "linear warm-up then cosine decay); "
        f"{'lower' if perplexity else 'higher'} is better; mean ± sample std over seeds "
        f"{', '.join(map(str, seeds))}. `dense` is trained once per seed and shown at every "
        "sparsity; `pruned-no-recovery` is "
        + ("the pretrained checkpoint" if result.get("pretrain_steps") else "dense's final model")
        + " pruned by magnitude with no further training. `resurrected`: weights brought back "
        "by all commits of a run, mean over seeds; in brackets, how many of them had trained as "
        "theta (the others return as untrained zeros).",
    ]
    if "schedule_fraction" in result:
        notes.append(
            f"Pruning schedules (RESU cycles, GMP, one-shot) span the first "
            f"{result['schedule_fraction']:.0%} of the steps and the rest trains at the final "
            "sparsity; RigL stops changing masks at 75%."
            + (" One-shot prunes before the first step." if result.get("pretrain_steps") else "")
        )
    ablations = [f"`{m}`: {text}" for m, text in ACCURACY_ABLATIONS.items() if m in methods]
    if ablations:
        notes.append("Ablations of `resu` (the library's defaults): " + "; ".join(ablations) + ".")
    variants = {
        m: options
        for m, options in result.get("methods", {}).items()
        if m in methods and m not in ACCURACY_ABLATIONS and m not in BASELINE_LABELS
    }
    if variants:
        notes.append(
            "Options per label: "
            + "; ".join(f"`{m}`: `{json.dumps(o)}`" for m, o in variants.items())
            + "."
        )
    if checked:
        notes.append(
            "`after final prune`: the worst seed's change from its metric just before the "
            "schedule's final prune to its final metric (positive: worse), `ok` when within the "
            "cell's seed-to-seed std. " + _verdict(result["summary"])
        )
    if any(run.get("trace") for run in result["runs"]):
        notes.append(
            f"Validation traces (metric every few steps and after every transition): "
            f"`benchmarks/results/accuracy-{_study(result)}.png`."
        )
    if result.get("errors"):
        notes.append(f"**{len(result['errors'])} runs failed** and are missing from the table.")
    if result.get("partial"):
        notes.append(
            f"**Partial result**: the run stopped after {len(result['runs'])} trainings; "
            "cells with fewer seeds than the others are incomplete."
        )
    return "\n\n".join(
        [
            f"### {_study(result)}: {result['metric']}",
            _provenance(result, result["command"]),
            *notes,
            tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True),
        ]
    )


def _study(result: dict[str, Any]) -> str:
    """The study's name: its file's (``accuracy-<study>.json``), else the task's."""
    return result.get("study", result["task"])


def _after_final_prune(cell: dict[str, Any] | None, digits: int) -> str:
    if cell is None or cell.get("recovers") is None:
        return ""
    verdict = "ok" if cell["recovers"] else "**worse**"
    return f"{verdict} ({cell['worse_than_before_max']:+.{digits}f})"


def _verdict(summary: list[dict[str, Any]]) -> str:
    """The study's target, checked: no run ends worse than before its final prune by more than
    the seed spread."""
    checked = [row for row in summary if row.get("recovers") is not None]
    failed = [
        f"`{row['method']}` at {row['sparsity']:.0%}" for row in checked if not row["recovers"]
    ]
    if not failed:
        return f"Every one of the {len(checked)} checked cells is ok."
    return f"{len(failed)} of {len(checked)} checked cells are worse: {', '.join(failed)}."


def _mean_std(cell: dict[str, Any], digits: int) -> str:
    """``mean ± std`` over seeds; the mean alone for a single seed."""
    text = f"{cell['mean']:.{digits}f}"
    return f"{text} ± {cell['std']:.{digits}f}" if len(cell["seeds"]) > 1 else text


def accuracy_sections(results: Path) -> str:
    found = accuracy_results(results)
    if not found:
        return ACCURACY_NOT_MEASURED
    return "\n\n".join(accuracy_section(result) for result in found)


def sweep_section(result: dict[str, Any]) -> str:
    """The defaults sweep: every RESU variant (and RigL) on one task and sparsity, best first."""
    rows = [
        {
            "variant": row["method"],
            result["metric"]: _mean_std(row, 2),
            "resurrected (trained)": f"{row['resurrected_mean']:,.0f} "
            f"({row['resurrected_trained_mean']:,.0f})",
        }
        for row in result["summary"]
    ]
    return "\n\n".join(
        [
            f"### {result['task']} at {result['sparsity']:.0%} sparsity, {result['steps']} steps",
            _provenance(result, result["command"]),
            tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True),
        ]
    )


def tuning_section(result: dict[str, Any]) -> str:
    """The launch-configuration sweep behind ``kernels.launch.LAUNCH_CONFIGS``."""
    rows = [
        {
            "dtype": r["dtype"],
            "kernel": r["kernel"],
            "BLOCK": r["BLOCK"],
            "warps": r["warps"],
            "elements/thread": r["elements/thread"],
            "FP fusion": _flag(r["fp fusion"]),
            "% of copy": f"{r['% of copy']:.1f}",
            "default": _flag(r["default"]),
        }
        for r in result["rows"]
    ]
    shape = "x".join(map(str, result["shape"]))
    return "\n\n".join(
        [
            "### Launch configurations of the update kernels",
            _provenance(result, ["python -m benchmarks.tune_updates"]),
            f"Shape {shape}; copy ceiling {result['copy_ceiling_GBps']:.0f} GB/s in the same run. "
            "Every candidate runs with the default FP fusion setting, then the defaults with the "
            "other one; `default` marks what `kernels.launch.LAUNCH_CONFIGS` and `FP_FUSION` hold.",
            tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True),
        ]
    )


def _quartiles(values: list[float] | None) -> str:
    return "" if not values else f"{values[0]:.3f}–{values[1]:.3f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _flag(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "no")


def semi_sparse_section(result: dict[str, Any]) -> str:
    from benchmarks.semi_sparse import report

    return "\n\n".join(
        [
            "### 2:4 sparse phases on the sparse tensor cores (`semi_sparse=True`)",
            f"{_provenance(result, result['command'])}; {result['tokens']} tokens a step. Kernel times (ms) are CUDA-graph replays; *layer* is a training step's three "
            "products plus refreshing the two compressed weights, over the three dense products.",
            report(result, tablefmt="github"),
        ]
    )


def distributed_section(result: dict[str, Any]) -> str:
    from benchmarks.distributed import table

    return "\n\n".join(
        [
            f"### {result['world']} ranks ({result['backend']}): DDP and FSDP2",
            f"{_provenance(result, result['command'])}; sparsity {result['sparsity']}, "
            f"{result['batch_per_rank']} sequences of {result['context']} tokens per rank, "
            f"{result['steps_per_phase']} timed steps per phase. `x dense`: the slowest rank's "
            "median step over the same engine's dense step; bytes: what a rank hands to "
            "collectives during the transition; agreement: every rank's masks hash alike / the "
            "share of mask bits equal to a single-process run on the global batch.",
            table(result, tablefmt="github"),
        ]
    )


def performance_sections(results: Path) -> str:
    """The overhead, transitions, 2:4 and multi-GPU tables, as far as their JSON exists ("" if
    none)."""
    overhead = _load(results / "overhead.json")
    transitions = _load(results / "transitions.json")
    semi_sparse = _load(results / "semi_sparse.json")
    distributed = _load(results / "distributed.json")
    parts = []
    if overhead:
        parts.append(overhead_section(overhead))
    if transitions:
        parts.append(transitions_section(transitions))
    if semi_sparse:
        parts.append(semi_sparse_section(semi_sparse))
    if distributed:
        parts.append(distributed_section(distributed))
    return "\n\n".join(parts)


def render(results: Path) -> str:
    sections = [
        "# Benchmark results",
        "Generated by `benchmarks/render_results.py` from the JSON in `benchmarks/results/`.",
    ]
    performance = performance_sections(results)
    if performance:
        sections += ["## Graph-level overhead", performance]
    kernels = _load(results / "kernels.json")
    if kernels:
        sections += ["## Kernels", kernels_section(kernels)]
    tuning = _load(results / "tune_updates.json")
    if tuning:
        sections += [tuning_section(tuning)]
    sections += ["## Accuracy", accuracy_sections(results)]
    sweeps = [json.loads(p.read_text()) for p in sorted(results.glob("sweep-*.json"))]
    if sweeps:
        sections += ["## Defaults sweep (theta-optimizer, rate, selection, alpha)"]
        sections += [sweep_section(sweep) for sweep in sweeps]
    return "\n\n".join(sections) + "\n"


def update_readme(
    readme: Path, body: str, start: str = README_START, end: str = README_END
) -> None:
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    document = render(args.results)
    (ROOT / "benchmarks" / "RESULTS.md").write_text(document)
    summary = performance_sections(args.results) or "No GPU results yet."
    update_readme(
        ROOT / "README.md",
        summary + "\n\nKernel tables: [benchmarks/RESULTS.md](benchmarks/RESULTS.md).",
    )
    update_readme(ROOT / "README.md", accuracy_sections(args.results), ACCURACY_START, ACCURACY_END)
    print(document)


if __name__ == "__main__":
    main()
