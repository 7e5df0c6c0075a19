"""The evidence behind RESU's defaults: theta-optimizer, learning rate, selective mode and alpha.

Two small sweeps on one task and sparsity, under the accuracy benchmark's protocol (same data
order, step budget, AdamW and learning-rate schedule for the active weights):

1. theta-optimizer x theta learning rate, with random selection at alpha = 0.2;
2. selective mode and alpha, with the theta-optimizer and rate given by ``--theta``.

Every variant runs METHOD.md's frozen RESU phase, so only theta's own rules differ.

Usage (GPU machine):

    python -m benchmarks.sweep_defaults --task fmnist-mlp --sparsity 0.9 --seeds 0,1 \
        [--theta adamw:1e-3] [--data DIR] [--workers 8]

writes ``benchmarks/results/sweep-<task>.json`` and prints the table; ``render_results.py``
renders it into RESULTS.md. The README says which defaults it supports and why.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.accuracy import ROOT, Run, execute, summarize
from benchmarks.accuracy_tasks import TASKS
from benchmarks.common import environment, write_json

#: Theta learning rates tried per theta-optimizer (SGD steps are raw gradients, so larger rates).
THETA_RATES = {
    "sgd": (1e-3, 1e-2, 1e-1),
    "momentum": (1e-3, 1e-2, 1e-1),
    "adamw": (1e-4, 1e-3, 1e-2),
}
#: Selective modes tried (with the theta-optimizer of ``--theta``).
SELECTIONS = (
    {"selection": "random", "alpha": 0.1},
    {"selection": "random", "alpha": 0.2},
    {"selection": "random", "alpha": 0.5},
    {"selection": "all"},
    {"selection": "topk", "alpha": 0.2},
    {"selection": "consistency", "alpha": 0.2},
)


#: Held fixed in every variant: METHOD.md's frozen RESU phase (the default when the recorded sweep
#: ran), so the sweep isolates what theta does.
_BASE = {"method": "resu", "freeze_active": True, "freeze_others": True}


def _label(options: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in options.items())


def variants(theta: tuple[str, float]) -> list[tuple[str, dict[str, Any]]]:
    """(label, options) of every RESU variant of both sweeps, each once."""
    out: dict[str, dict[str, Any]] = {}
    for rule, rates in THETA_RATES.items():
        for rate in rates:
            options = {"theta_optimizer": rule, "theta_lr": rate, **SELECTIONS[1]}
            out[_label(options)] = {**_BASE, **options}
    rule, rate = theta
    for selection in SELECTIONS:
        options = {"theta_optimizer": rule, "theta_lr": rate, **selection}
        out.setdefault(_label(options), {**_BASE, **options})
    return list(out.items())


def _theta(text: str) -> tuple[str, float]:
    rule, _, rate = text.partition(":")
    if rule not in THETA_RATES or not rate:
        raise argparse.ArgumentTypeError(f"expected RULE:RATE with RULE in {list(THETA_RATES)}")
    return rule, float(rate)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep_defaults", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--task", default="fmnist-mlp", choices=sorted(TASKS))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--theta", type=_theta, default=("adamw", 1e-3))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    task = TASKS[args.task]
    if args.steps:
        task = type(task)(**{**task.__dict__, "steps": args.steps})
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [
        Run(task, label, args.sparsity, seed, options=tuple(options.items()))
        for label, options in variants(args.theta)
        for seed in seeds
    ]
    runs += [Run(task, "rigl", args.sparsity, seed) for seed in seeds]  # the bar to clear
    device = torch.device(args.device)
    compiler = "inductor" if device.type == "cuda" else "aot_eager"
    print(f"{len(runs)} runs of {task.steps} steps on {device}", flush=True)
    start = time.perf_counter()
    records = execute(
        runs,
        device=str(device),
        compiler=compiler,
        data_dir=args.data,
        workers=args.workers if device.type == "cuda" else 1,
        log=lambda line: print(line, flush=True),
    )
    summary = summarize(task, records, [args.sparsity])
    summary.sort(key=lambda row: row["mean"], reverse=task.higher_is_better)
    result = {
        "task": task.name,
        **environment(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "command": shlex.join(["python", "-m", "benchmarks.sweep_defaults", *argv]),
        "steps": task.steps,
        "sparsity": args.sparsity,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "wall_seconds": time.perf_counter() - start,
        "runs": [r for r in records if "error" not in r],
        "errors": [r for r in records if "error" in r],
        "summary": summary,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"sweep-{task.name}.json"
    write_json(out, result)
    rows = [
        {
            "variant": row["method"],
            task.metric: f"{row['mean']:.2f} ± {row['std']:.2f}",
            "resurrected (trained)": f"{row['resurrected_mean']:.0f} "
            f"({row['resurrected_trained_mean']:.0f})",
        }
        for row in summary
    ]
    print(tabulate(rows, headers="keys", disable_numparse=True))
    for error in result["errors"]:
        print(f"FAILED {error['run']}:\n{error['error']}", file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
