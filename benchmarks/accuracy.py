"""Accuracy of sparse-training methods on real tasks, under equal optimizer-step budgets.

Every method trains through the same front end, ``resu.compile(model, method=..., ...)`` and
``model.resu.step(optimizer)``, from the same initial weights, on the same minibatches, for the
same number of AdamW steps with the same learning-rate schedule (warm-up, then cosine decay).
Only held-out data is evaluated: the Fashion-MNIST test set, the King James Bible's held-out tail.

Methods (benchmark label: compile options):

Protocol: every pruning schedule ends at ``SCHEDULE_FRACTION`` (80%) of the budget and the rest
trains at the final sparsity (RigL stops changing masks at 75%, as in the paper), so no method is
judged on weights that joined in its last step.

* ``dense``: ``method="dense"``, never prunes; trained once per seed and shown at every sparsity.
  Its final weights are also pruned by magnitude to each sparsity and evaluated without any
  further training (row ``pruned-no-recovery``, no optimizer step of its own).
* ``oneshot``: one magnitude prune at 48% of the budget (cycle 0's TRAIN end, ``cycles=1``), then
  masked fine-tuning.
* ``gmp``: gradual magnitude pruning, Zhu & Gupta cubic schedule, one prune per cycle (5 cycles).
* ``rigl``: RigL (ERK, drop / grow every 100 steps until 75% of the budget).
* ``resu-random`` / ``resu-consistency``: RESU, 5 cycles, random / consistency selection, AdamW
  theta at 1e-3, the rest of the network training through the RESU phase (the defaults).
* ``resu-frozen``: RESU (random) as METHOD.md states it, with actives and every other parameter
  frozen during the RESU phase.

Runs go to ``--workers`` processes (spawned; each trains one run at a time from a shared queue), so
many small trainings share one GPU. Usage (GPU machine; the data folder holds ``fashion-mnist/``
and ``kjv/``):

    python -m benchmarks.accuracy --task fmnist-mlp [--data DIR] [--workers 8]

writes ``benchmarks/results/accuracy-<task>.json`` (every run, and mean / std over seeds per
sparsity and method) and prints the summary table; ``benchmarks/render_results.py`` renders it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import queue
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import resu_compile as resu
from benchmarks.accuracy_tasks import TASKS, Task, cross_entropy
from benchmarks.common import environment, write_json
from resu_compile.method.pruning import prune_mask

ROOT = Path(__file__).resolve().parent.parent

_RESU = {"method": "resu", "cycles": 5, "theta_optimizer": "adamw", "theta_lr": 1e-3}
_UNFROZEN = {"freeze_active": False, "freeze_others": False}
#: Benchmark label -> ``resu.compile`` options (besides sparsity, total_steps, seed, compiler).
METHODS: dict[str, dict[str, Any]] = {
    "dense": {"method": "dense"},
    "oneshot": {"method": "oneshot", "cycles": 1},
    "gmp": {"method": "gmp", "cycles": 5},
    "rigl": {"method": "rigl"},
    # RESU's options are spelled out, so a label means the same thing whatever the defaults.
    "resu-random": {**_RESU, "selection": "random", **_UNFROZEN},
    "resu-consistency": {**_RESU, "selection": "consistency", **_UNFROZEN},
    # METHOD.md's RESU phase: actives and every other parameter frozen while theta trains.
    "resu-frozen": {**_RESU, "selection": "random", "freeze_active": True, "freeze_others": True},
}
#: The dense run's final weights pruned by magnitude, evaluated with no further training.
NO_RECOVERY = "pruned-no-recovery"
#: Share of the step budget the pruning schedules span (cycles of RESU, GMP, one-shot).
SCHEDULE_FRACTION = 0.8
TRAIN_LOSS_WINDOW = 50  # the recorded train loss is the mean over the last this many steps


@dataclass(frozen=True)
class Run:
    """One training run. ``sparsity`` is None for dense, which evaluates ``no_recovery`` instead."""

    task: Task
    method: str
    sparsity: float | None
    seed: int
    no_recovery: tuple[float, ...] = ()
    #: Options on top of ``METHODS[method]`` (a sweep's variants); ``method`` is then a label.
    options: tuple[tuple[str, Any], ...] = ()

    def label(self) -> str:
        where = "" if self.sparsity is None else f" s={self.sparsity}"
        return f"{self.task.name} {self.method}{where} seed={self.seed}"


def plan(
    task: Task, methods: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int]
) -> list[Run]:
    """Every run: dense once per seed, every other method once per (sparsity, seed)."""
    runs = []
    for seed in seeds:
        for method in methods:
            if method == "dense":
                runs.append(Run(task, method, None, seed, tuple(sparsities)))
            else:
                runs.extend(Run(task, method, s, seed) for s in sparsities)
    return runs


def compile_options(run: Run, compiler: str) -> dict[str, Any]:
    """The ``resu.compile`` options of ``run``: every method gets the same step budget."""
    method = {**METHODS.get(run.method, {}), **dict(run.options)}
    schedule = run.task.steps
    if method.get("method") in ("resu", "gmp", "oneshot"):
        schedule = int(SCHEDULE_FRACTION * run.task.steps)
    options = {"total_steps": schedule, "seed": run.seed, "compiler": compiler}
    if run.sparsity is not None:
        options["sparsity"] = run.sparsity
    return {**options, **method}


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _evaluate(
    run: Run, model: torch.nn.Module, data: Any, device: torch.device, limit: int | None
) -> float:
    model.eval()
    with _autocast(device):
        metric = run.task.evaluate(model, data, limit)
    model.train()
    return metric


@torch.no_grad()
def pruned_without_recovery(
    model: torch.nn.Module, names: Iterable[str], sparsity: float, evaluate: Callable[[], float]
) -> float:
    """``evaluate()`` with the weights ``names`` pruned one-shot by magnitude; then restores them."""
    saved = {name: model.get_parameter(name).detach().clone() for name in names}
    try:
        for name in saved:
            weight = model.get_parameter(name)
            weight.mul_(prune_mask(weight, None, sparsity))
        return evaluate()
    finally:
        for name, value in saved.items():
            model.get_parameter(name).copy_(value)


def train_run(
    run: Run, data: Any, device: torch.device, compiler: str, max_eval: int | None = None
) -> dict[str, Any]:
    """Train ``run`` from scratch, evaluate it on held-out data and return its record."""
    task = run.task
    start = time.perf_counter()
    torch._dynamo.reset()  # a fresh model per run: no cache entries of the previous one
    torch.manual_seed(run.seed)
    model = task.model().to(device)
    compiled = resu.compile(model, **compile_options(run, compiler))
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=task.lr,
        betas=task.betas,
        weight_decay=task.weight_decay,
        fused=device.type == "cuda",
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, task.lr_factor)
    losses = []
    steps = 0
    for inputs, targets in task.batches(data, task.batch_size, task.steps, run.seed):
        with _autocast(device):
            loss = cross_entropy(compiled(inputs), targets)
        loss.backward()
        compiled.resu.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        steps += 1
        if steps > task.steps - TRAIN_LOSS_WINDOW:
            losses.append(loss.detach())
    if steps != task.steps:
        raise RuntimeError(f"{run.label()}: {steps} steps trained, expected {task.steps}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start
    # Storage is in place: the original module's weights are the trained sparse model.
    metric = _evaluate(run, model, data, device, max_eval)
    masks = compiled.resu.masks()
    total = sum(model.get_parameter(name).numel() for name in masks)
    pruned = sum(int((~mask).sum()) for mask in masks.values() if mask is not None)
    resurrected = compiled.resu.resurrected_per_cycle()
    commits = [event for event in compiled.resu.history if event["event"] == "commit"]
    record = {
        "task": task.name,
        "method": run.method,
        "sparsity": run.sparsity,
        "seed": run.seed,
        "steps": steps,
        "metric": metric,
        "actual_sparsity": pruned / total,
        "managed_weights": total,
        "resurrected": sum(resurrected),
        "resurrected_per_cycle": resurrected,
        # Of those, the ones that trained as theta (the others came back as untrained zeros).
        "resurrected_trained": sum(
            layer.get("resurrected_trained", 0) for e in commits for layer in e["layers"].values()
        ),
        "final_phase": compiled.resu.phase.value,
        "train_loss": torch.stack(losses).mean().item(),
        "nonfinite_steps": compiled.resu.nonfinite_steps,
        "train_seconds": train_seconds,
    }
    if run.no_recovery:
        record["no_recovery"] = {
            str(s): pruned_without_recovery(
                model, masks, s, lambda: _evaluate(run, model, data, device, max_eval)
            )
            for s in run.no_recovery
        }
    record["seconds"] = time.perf_counter() - start
    return record


# --------------------------------------------------------------------------------------------------
# Running many trainings at once
# --------------------------------------------------------------------------------------------------


class _Worker:
    """Per-process state: the device, and each task's data loaded once."""

    def __init__(self, device: str, compiler: str, data_dir: str | None, max_eval: int | None):
        self.device, self.compiler = torch.device(device), compiler
        self.data_dir, self.max_eval = data_dir, max_eval
        self.data: dict[Any, Any] = {}

    def __call__(self, run: Run) -> dict[str, Any]:
        if run.task.load not in self.data:
            self.data[run.task.load] = run.task.load(self.data_dir, self.device)
        return train_run(run, self.data[run.task.load], self.device, self.compiler, self.max_eval)


def _worker_loop(inbox: Any, outbox: Any, threads: int, *worker_args: Any) -> None:
    torch.set_num_threads(threads)
    worker = _Worker(*worker_args)
    while (item := inbox.get()) is not None:
        index, run = item
        try:
            outbox.put((index, worker(run)))
        except Exception:
            outbox.put((index, {"error": traceback.format_exc(), "run": run.label()}))


def execute(
    runs: Sequence[Run],
    *,
    device: str,
    compiler: str,
    data_dir: str | None = None,
    workers: int = 1,
    max_eval: int | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    on_record: Callable[[list[dict[str, Any] | None]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every run's record (or ``{"error", "run"}``), in the order of ``runs``.

    ``workers == 1`` trains in this process, with the caller's intra-op thread count unless
    ``threads`` is given; more spawn that many processes fed from one queue, each with ``threads``
    intra-op threads (default: the cores shared out among the workers). ``on_record`` sees the
    records so far (None for runs not finished) after each run, e.g. to save partial results.
    """
    worker_args = (device, compiler, data_dir, max_eval)
    records: list[dict[str, Any] | None] = [None] * len(runs)
    start = time.perf_counter()

    def done(index: int, record: dict[str, Any]) -> None:
        records[index] = record
        if on_record is not None:
            on_record(records)
        finished = sum(r is not None for r in records)
        outcome = "FAILED" if "error" in record else f"{record['metric']:.4g}"
        log(
            f"[{finished}/{len(runs)} {time.perf_counter() - start:6.0f}s] "
            f"{runs[index].label()}: {outcome}"
        )

    if workers == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads or previous)
        try:
            worker = _Worker(*worker_args)
            for index, run in enumerate(runs):
                try:
                    done(index, worker(run))
                except Exception:
                    done(index, {"error": traceback.format_exc(), "run": run.label()})
        finally:
            torch.set_num_threads(previous)
        return records  # type: ignore[return-value]

    threads = threads or max(1, (os.cpu_count() or 1) // workers)

    # Inductor's own compile pool, per process, would otherwise take every core in each worker.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
    context = torch.multiprocessing.get_context("spawn")
    inbox, outbox = context.Queue(), context.Queue()
    for item in enumerate(runs):
        inbox.put(item)
    for _ in range(workers):
        inbox.put(None)
    processes = [
        context.Process(target=_worker_loop, args=(inbox, outbox, threads, *worker_args))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    while any(r is None for r in records):
        try:
            done(*outbox.get(timeout=10))
        except queue.Empty:
            if not any(process.is_alive() for process in processes):
                break  # every worker is gone: the missing runs crashed their process
    for process in processes:
        process.join()
    for index, record in enumerate(records):
        if record is None:
            records[index] = {"error": "worker process died", "run": runs[index].label()}
    return records  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Summary and command line
# --------------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(
    task: Task, records: Sequence[dict[str, Any]], sparsities: Sequence[float]
) -> list[dict[str, Any]]:
    """Mean and std over seeds per (sparsity, method); dense appears at every sparsity."""
    ok = [r for r in records if "error" not in r]
    seen = list(dict.fromkeys(r["method"] for r in ok))
    methods = [m for m in METHODS if m in seen] + [m for m in seen if m not in METHODS]
    if "dense" in methods:
        methods.insert(methods.index("dense") + 1, NO_RECOVERY)
    summary = []
    for sparsity in sparsities:
        for method in methods:
            if method == NO_RECOVERY:
                chosen = [r for r in ok if r["method"] == "dense"]
                values = [r["no_recovery"][str(sparsity)] for r in chosen]
                resurrected, actual = [0] * len(chosen), [sparsity] * len(chosen)
                trained = resurrected
            else:
                chosen = [
                    r for r in ok if r["method"] == method and r["sparsity"] in (None, sparsity)
                ]
                values = [r["metric"] for r in chosen]
                resurrected = [r["resurrected"] for r in chosen]
                trained = [r["resurrected_trained"] for r in chosen]
                actual = [r["actual_sparsity"] for r in chosen]
            if not chosen:
                continue
            mean, std = _mean_std(values)
            summary.append(
                {
                    "sparsity": sparsity,
                    "method": method,
                    "metric": task.metric,
                    "mean": mean,
                    "std": std,
                    "seeds": [r["seed"] for r in chosen],
                    "values": values,
                    "resurrected_mean": statistics.fmean(resurrected),
                    "resurrected_trained_mean": statistics.fmean(trained),
                    "actual_sparsity_mean": statistics.fmean(actual),
                    "seconds_mean": (
                        0.0
                        if method == NO_RECOVERY
                        else statistics.fmean(r["seconds"] for r in chosen)
                    ),
                }
            )
    return summary


def table(summary: Sequence[dict[str, Any]], higher_is_better: bool) -> str:
    digits = 2 if higher_is_better else 3
    rows = [
        {
            "sparsity": row["sparsity"],
            "method": row["method"],
            row["metric"]: f"{row['mean']:.{digits}f}"
            + (f" ± {row['std']:.{digits}f}" if len(row["seeds"]) > 1 else ""),
            "seeds": len(row["seeds"]),
            "resurrected": f"{row['resurrected_mean']:.0f}",
            "of them trained": f"{row['resurrected_trained_mean']:.0f}",
            "actual sparsity": f"{row['actual_sparsity_mean']:.4f}",
            "s / run": f"{row['seconds_mean']:.1f}",
        }
        for row in summary
    ]
    return tabulate(rows, headers="keys", disable_numparse=True)


def _csv(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item.strip()]

    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--sparsities", type=_csv(float), default=[0.7, 0.9])
    parser.add_argument("--methods", type=_csv(str), default=list(METHODS))
    parser.add_argument("--seeds", type=_csv(int), default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: per task)")
    parser.add_argument("--batch-size", type=int, help="minibatch size (default: per task)")
    parser.add_argument(
        "--workers", type=int, help="training processes at once (default: 8 on cuda, 1 on cpu)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="intra-op CPU threads per worker (default: the cores shared out among the workers)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--compiler",
        choices=["inductor", "aot_eager", "eager"],
        help="inner compiler of the resu graphs (default: inductor on cuda, aot_eager on cpu)",
    )
    parser.add_argument(
        "--data",
        default=os.environ.get("RESU_DATA") or str(ROOT.parent / "shared" / "data"),
        help="folder holding fashion-mnist/ and kjv/ (default: $RESU_DATA, then ../shared/data)",
    )
    parser.add_argument(
        "--max-eval",
        type=int,
        help="evaluate only the first N held-out images / windows (smoke runs; default: all)",
    )
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/accuracy-<task>.json")
    parser.add_argument(
        "--merge",
        type=Path,
        help="an earlier result JSON of this task: its runs of methods not run now (and still "
        "defined) are kept beside the new ones, e.g. to re-run only RESU after a change",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if any(not 0.0 < s < 1.0 for s in args.sparsities):
        parser.error("sparsities must lie in (0, 1)")
    for name in ("steps", "batch_size", "workers", "threads", "max_eval"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    task = TASKS[args.task]
    task = dataclasses.replace(
        task, steps=args.steps or task.steps, batch_size=args.batch_size or task.batch_size
    )
    device = torch.device(args.device)
    compiler = args.compiler or ("inductor" if device.type == "cuda" else "aot_eager")
    workers = args.workers or (8 if device.type == "cuda" else 1)
    runs = plan(task, args.methods, args.sparsities, args.seeds)
    print(f"{len(runs)} runs of {task.steps} steps on {device} with {workers} workers", flush=True)
    start = time.perf_counter()
    out = args.out or ROOT / "benchmarks" / "results" / f"accuracy-{task.name}.json"

    command = shlex.join(["python", "-m", "benchmarks.accuracy", *argv])
    kept, commands = [], [command]
    if args.merge is not None:
        earlier = json.loads(args.merge.read_text())
        if earlier["task"] != task.name or earlier["steps"] != task.steps:
            raise SystemExit(
                f"--merge: {args.merge} is not a {task.name} run of {task.steps} steps"
            )
        kept = [
            r for r in earlier["runs"] if r["method"] in METHODS and r["method"] not in args.methods
        ]
        commands = [*earlier.get("commands", [earlier["command"]]), command]

    def result_of(records: Sequence[dict[str, Any] | None], partial: bool) -> dict[str, Any]:
        done = kept + [r for r in records if r is not None]
        return {
            "task": task.name,
            **environment(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "command": " && ".join(commands),
            "commands": commands,
            "partial": partial,
            "steps": task.steps,
            "batch_size": task.batch_size,
            "optimizer": {
                "name": "AdamW",
                "lr": task.lr,
                "betas": list(task.betas),
                "weight_decay": task.weight_decay,
                "warmup_fraction": task.warmup_fraction,
                "final_lr_fraction": task.final_lr_fraction,
            },
            "model_args": dict(task.model_args),
            "metric": task.metric,
            "higher_is_better": task.higher_is_better,
            "compiler": compiler,
            "workers": workers,
            "max_eval": args.max_eval,
            "schedule_fraction": SCHEDULE_FRACTION,
            "methods": {
                m: METHODS[m] for m in dict.fromkeys(r["method"] for r in done) if m in METHODS
            },
            "wall_seconds": time.perf_counter() - start,
            "runs": [r for r in done if "error" not in r],
            "errors": [r for r in done if "error" in r],
            "summary": summarize(task, done, args.sparsities),
        }

    records = execute(
        runs,
        device=str(device),
        compiler=compiler,
        data_dir=args.data,
        workers=workers,
        max_eval=args.max_eval,
        threads=args.threads or max(1, (os.cpu_count() or 1) // workers),
        log=lambda line: print(line, flush=True),
        # Saved after every run, so a run cut short by a time limit still leaves its results.
        on_record=lambda so_far: write_json(out, result_of(so_far, partial=True)),
    )
    result = result_of(records, partial=False)
    records = result["runs"] + result["errors"]
    write_json(out, result)
    errors, summary = result["errors"], result["summary"]
    for error in errors:
        print(f"\n{error['run']} failed:\n{error['error']}", file=sys.stderr)
    print(f"\n{len(records) - len(errors)}/{len(records)} runs in {result['wall_seconds']:.0f} s")
    print(f"written to {out}\n")
    print(f"{task.name}: {task.metric}, mean ± std over seeds, {task.steps} steps per run")
    print(table(summary, task.higher_is_better))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
