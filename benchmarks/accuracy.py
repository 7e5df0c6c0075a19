"""Accuracy of sparse-training methods on real tasks, under equal optimizer-step budgets.

Every method trains through the same front end, ``resu.compile(model, method=..., ...)`` and
``model.resu.step(optimizer)``, from the same initial weights, on the same minibatches, for the
same number of AdamW steps with the same learning-rate schedule (warm-up, then cosine decay).
Only held-out data is evaluated (see ``benchmarks/accuracy_tasks.py`` for the tasks).

Protocol: every pruning schedule ends at ``SCHEDULE_FRACTION`` (80%) of the budget and the rest
trains at the final sparsity (RigL stops changing masks at 75%, as in the paper), so no method is
judged on weights that joined in its last step. A recovery task (``pretrain_steps`` > 0) trains
its model dense once per seed, caches the checkpoint (``--cache``), and every method then starts
from it with the same budget of ``steps``; its batches come from another seed than pretraining's.

Methods (benchmark label: compile options). The default plan is :data:`DEFAULT_METHODS`:

* ``dense``: ``method="dense"``, never prunes; trained once per seed and shown at every sparsity.
  Row ``pruned-no-recovery``: the dense starting point of the comparison pruned by magnitude to
  each sparsity and evaluated with no optimizer step (from scratch: dense's final weights; in a
  recovery task: the pretrained checkpoint).
* ``oneshot``: one magnitude prune at 48% of the budget (cycle 0's TRAIN end, ``cycles=1``), then
  masked fine-tuning; in a recovery task it prunes before the first step (the usual LLM baseline).
* ``gmp``: gradual magnitude pruning, Zhu & Gupta cubic schedule, one prune per cycle (5 cycles).
* ``rigl``: RigL (random ERK mask, drop / grow every 100 steps until 75% of the budget).
* ``resu``: ``method="resu"`` and nothing else: the library's defaults.
* ``resu-no-resu-phase`` (ablation): ``method="gmp"`` with the cycles, schedule and
  ``phase_fractions`` of the default RESU, so it prunes at the same steps to the same sparsities;
  where RESU stabilizes, trains theta and commits by amnesty, it trains the masked network. The
  difference to ``resu`` is what the RESU phase and the amnesty add.
* ``resu-no-amnesty`` (ablation): the default RESU with ``amnesty=False`` (the commit merges all
  theta instead of the tournament).
* ``resu-random`` / ``resu-consistency`` / ``resu-frozen`` (``--methods``): RESU with its options
  spelled out as in earlier studies (5 cycles, AdamW theta at 1e-3, random / consistency
  selection; ``resu-frozen`` freezes actives and other parameters in the RESU phase, METHOD.md).
* ``--variant NAME:KEY=VALUE,...``: RESU (or ``method=...``) with those options on top, values
  parsed as JSON where they parse (``schedule=cubic``, ``exclude=["lm.lm_head.weight"]``,
  ``theta_lr=1e-4``), so that a default can be studied without a code change.

Every run records a validation trace: the metric on ``task.trace_limit`` held-out items every
``steps / TRACE_POINTS`` steps and right after every transition (a new event in
``model.resu.history``: prune, resu, commit, rigl), and, on the full held-out set, the metric just
before its final prune. The summary checks that no run ends worse than that value by more than the
seed-to-seed spread (``recovers``); ``benchmarks/accuracy_plot.py`` draws the traces.

Runs go to ``--workers`` processes (spawned; each trains one run at a time from a shared queue), so
many small trainings share one GPU. Usage (GPU machine; the data folder holds ``fashion-mnist/``,
``kjv/`` and ``sotu/``):

    python -m benchmarks.accuracy --task sotu-llama [--data DIR] [--workers 12] [--resume]

writes ``benchmarks/results/accuracy-<task>.json`` after every finished run (every run, and mean /
std over seeds per sparsity and method), then the figure ``accuracy-<task>.png`` beside it, and
prints the summary table; ``benchmarks/render_results.py`` renders it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import os
import queue
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
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
DEFAULT_CACHE = ROOT / ".out" / "accuracy-cache"


def _without_resu_phase() -> dict[str, Any]:
    """GMP pruning at the default RESU's steps to its sparsities: its cycles, schedule and phase
    split, so only the RESU phase (stabilize, theta, amnesty commit) is missing."""
    default = resu.ResuConfig(method="resu")
    return {
        "method": "gmp",
        "cycles": default.cycles,
        "schedule": default.schedule,
        "phase_fractions": default.phase_fractions,
        "distribution": default.distribution,
    }


_RESU = {"method": "resu", "cycles": 5, "theta_optimizer": "adamw", "theta_lr": 1e-3}
_UNFROZEN = {"freeze_active": False, "freeze_others": False}
#: Benchmark label -> ``resu.compile`` options (besides sparsity, total_steps, seed, compiler).
METHODS: dict[str, dict[str, Any]] = {
    "dense": {"method": "dense"},
    "oneshot": {"method": "oneshot", "cycles": 1},
    "gmp": {"method": "gmp", "cycles": 5},
    "rigl": {"method": "rigl"},
    "resu": {"method": "resu"},  # the library's defaults
    "resu-no-resu-phase": _without_resu_phase(),
    "resu-no-amnesty": {"method": "resu", "amnesty": False},
    # Earlier studies' RESU, options spelled out, so a label means the same whatever the defaults.
    "resu-random": {**_RESU, "selection": "random", **_UNFROZEN},
    "resu-consistency": {**_RESU, "selection": "consistency", **_UNFROZEN},
    # METHOD.md's RESU phase: actives and every other parameter frozen while theta trains.
    "resu-frozen": {**_RESU, "selection": "random", "freeze_active": True, "freeze_others": True},
}
DEFAULT_METHODS = (
    "dense",
    "oneshot",
    "gmp",
    "rigl",
    "resu",
    "resu-no-resu-phase",
    "resu-no-amnesty",
)
#: The dense run's final weights pruned by magnitude, evaluated with no further training.
NO_RECOVERY = "pruned-no-recovery"
#: The label of a recovery task's dense pretraining (one per seed, before the other runs).
PRETRAIN = "pretrain"
#: Share of the step budget the pruning schedules span (cycles of RESU, GMP, one-shot).
SCHEDULE_FRACTION = 0.8
#: One-shot in a recovery task: the prune comes before the first step, the rest fine-tunes.
PRUNE_AT_START = (0.0, 0.0, 1.0)
RECOVERY_SEED_OFFSET = 1000  # recovery batches: seed + this, another stream than pretraining's
TRAIN_LOSS_WINDOW = 50  # the recorded train loss is the mean over the last this many steps
TRACE_POINTS = 25  # periodic points of the validation trace (transitions add their own)


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
    task: Task,
    methods: Sequence[str],
    sparsities: Sequence[float],
    seeds: Sequence[int],
    variants: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Run]:
    """Every run: dense once per seed, every other method (and variant) once per (sparsity, seed)."""
    runs = []
    labelled = [(m, ()) for m in methods]
    labelled += [(name, tuple(options.items())) for name, options in (variants or {}).items()]
    for seed in seeds:
        for method, options in labelled:
            if method == "dense":
                runs.append(Run(task, method, None, seed, tuple(sparsities)))
            else:
                runs.extend(Run(task, method, s, seed, options=options) for s in sparsities)
    return runs


def compile_options(run: Run, compiler: str) -> dict[str, Any]:
    """The ``resu.compile`` options of ``run``: every method gets the same step budget."""
    method = {**METHODS.get(run.method, {}), **dict(run.options)}
    if run.task.pretrain_steps and method.get("method") == "oneshot":
        method = {"phase_fractions": PRUNE_AT_START, **method}
    schedule = run.task.steps
    if method.get("method") in ("resu", "gmp", "oneshot"):
        schedule = int(SCHEDULE_FRACTION * run.task.steps)
    options = {"total_steps": schedule, "seed": run.seed, "compiler": compiler}
    if run.sparsity is not None:
        options["sparsity"] = run.sparsity
    return {**options, **method}


def final_prune_step(options: Mapping[str, Any]) -> int | None:
    """The step count of the last "prune" event the schedule of ``options`` records, or None for
    methods without a magnitude prune (dense; RigL, whose one prune is its random initial mask)."""
    config = resu.ResuConfig.from_options(dict(options))
    train = config.phase_steps[0]
    if config.method == "resu" and not config.amnesty:  # the re-prune after the last merge
        return config.cycles * config.cycle_length
    if config.method in ("resu", "gmp"):
        return (config.cycles - 1) * config.cycle_length + train
    if config.method == "oneshot":
        return train
    return None


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _evaluate(
    task: Task, model: torch.nn.Module, data: Any, device: torch.device, limit: int | None
) -> float:
    """The held-out metric of the module itself (in-place storage: its weights are ``W_eff``,
    theta included during a RESU phase), in eval mode."""
    model.eval()
    with _autocast(device):
        metric = task.evaluate(model, data, limit)
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


def _smaller(limit: int | None, other: int | None) -> int | None:
    return other if limit is None else limit if other is None else min(limit, other)


def train_run(
    run: Run,
    data: Any,
    device: torch.device,
    compiler: str,
    max_eval: int | None = None,
    initial: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train ``run`` (from ``initial`` weights when given, else from its seed's initialisation),
    evaluate it on held-out data and return its record."""
    return _train(run, data, device, compiler, max_eval, initial)[0]


def _train(
    run: Run,
    data: Any,
    device: torch.device,
    compiler: str,
    max_eval: int | None,
    initial: Mapping[str, torch.Tensor] | None,
) -> tuple[dict[str, Any], torch.nn.Module]:
    """:func:`train_run`'s record, and the trained module."""
    task = run.task
    start = time.perf_counter()
    torch._dynamo.reset()  # a fresh model per run: no cache entries of the previous one
    torch.manual_seed(run.seed)
    model = task.model().to(device)
    if initial is not None:
        model.load_state_dict(initial)
    options = compile_options(run, compiler)
    compiled = resu.compile(model, **options)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=task.lr,
        betas=task.betas,
        weight_decay=task.weight_decay,
        fused=device.type == "cuda",
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, task.lr_factor)
    trace_limit = _smaller(task.trace_limit, max_eval)
    every = max(1, task.steps // TRACE_POINTS)
    final_prune = final_prune_step(options)
    before_step = None if final_prune is None else max(final_prune - 1, 0)
    before_final_prune = None
    history = compiled.resu.history
    trace = []
    eval_seconds = 0.0

    def evaluate(limit: int | None) -> float:
        nonlocal eval_seconds
        began = time.perf_counter()
        metric = _evaluate(task, model, data, device, limit)
        eval_seconds += time.perf_counter() - began
        return metric

    def observe(steps: int, events: list[str]) -> None:
        nonlocal before_final_prune
        if steps == before_step:
            before_final_prune = {"step": steps, "metric": evaluate(max_eval)}
        if events or steps == before_step or steps % every == 0 or steps == task.steps:
            label = "+".join(events) or (
                "before-final-prune" if steps == before_step else "start" if steps == 0 else "every"
            )
            trace.append({"step": steps, "metric": evaluate(trace_limit), "event": label})

    observe(0, [])
    seen = len(history)
    losses = []
    steps = 0
    batch_seed = run.seed + (RECOVERY_SEED_OFFSET if task.pretrain_steps else 0)
    for inputs, targets in task.batches(data, task.batch_size, task.steps, batch_seed):
        with _autocast(device):
            loss = cross_entropy(compiled(inputs), targets)
        loss.backward()
        compiled.resu.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        steps += 1
        if steps > task.steps - TRAIN_LOSS_WINDOW:
            losses.append(loss.detach())
        observe(steps, [event["event"] for event in history[seen:]])
        seen = len(history)
    if steps != task.steps:
        raise RuntimeError(f"{run.label()}: {steps} steps trained, expected {task.steps}")
    prunes = [event["step"] for event in history if event["event"] == "prune"]
    misplaced = None
    if final_prune is not None and (not prunes or prunes[-1] != final_prune):
        # The schedule moved under the benchmark: the value taken is not "just before" the prune.
        misplaced = f"last prune at step {prunes[-1] if prunes else None}, expected {final_prune}"
        before_final_prune = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start - eval_seconds
    # Storage is in place: the original module's weights are the trained sparse model.
    metric = evaluate(max_eval)
    masks = compiled.resu.masks()
    total = sum(model.get_parameter(name).numel() for name in masks)
    pruned = sum(int((~mask).sum()) for mask in masks.values() if mask is not None)
    resurrected = compiled.resu.resurrected_per_cycle()
    commits = [event for event in history if event["event"] == "commit"]
    record = {
        "task": task.name,
        "method": run.method,
        "sparsity": run.sparsity,
        "seed": run.seed,
        "options": json.loads(json.dumps(options)),
        "config": resolved_config(options),
        "steps": steps,
        "metric": metric,
        "before_final_prune": before_final_prune,
        "before_final_prune_error": misplaced,
        "trace": trace,
        "trace_every": every,
        "trace_limit": trace_limit,
        "transitions": [{"event": e["event"], "step": e["step"]} for e in history],
        "actual_sparsity": pruned / total,
        # Per layer, so a layer rule's shares (global, ERK) can be read off every run.
        "layer_sparsity": {
            name: 0.0 if mask is None else 1.0 - int(mask.sum()) / mask.numel()
            for name, mask in masks.items()
        },
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
        "eval_seconds": eval_seconds,
    }
    if run.no_recovery:
        # From scratch, the trained dense model; in a recovery task, the checkpoint it started from.
        source = model
        if initial is not None:
            source = task.model().to(device)
            source.load_state_dict(initial)
        record["no_recovery"] = {
            str(s): pruned_without_recovery(
                source, masks, s, lambda: _evaluate(task, source, data, device, max_eval)
            )
            for s in run.no_recovery
        }
    record["seconds"] = time.perf_counter() - start
    return record, model


# --------------------------------------------------------------------------------------------------
# Recovery tasks: one dense checkpoint per seed, shared by every run of that seed
# --------------------------------------------------------------------------------------------------


def checkpoint_path(task: Task, seed: int, cache_dir: Path) -> Path:
    """Where ``task``'s pretrained weights of ``seed`` are cached: keyed by everything that
    determines them, so a changed task never reuses a stale checkpoint."""
    key = json.dumps(
        [
            task.name,
            task.build.__qualname__,
            dict(task.model_args),
            task.pretrain_steps,
            task.batch_size,
            task.lr,
            task.weight_decay,
            list(task.betas),
            task.warmup_fraction,
            task.final_lr_fraction,
            seed,
        ],
        default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir / f"{task.name}-seed{seed}-{digest}.pt"


def pretrained(
    task: Task,
    seed: int,
    data: Any,
    device: torch.device,
    compiler: str,
    cache_dir: Path,
    max_eval: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``task``'s dense checkpoint of ``seed`` and the record of its training: trained once and
    cached in ``cache_dir``; a file lock makes concurrent workers wait for the one training it."""
    path = checkpoint_path(task, seed, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = path.exists()
        if not cached:
            record, model = _train(
                Run(task.pretraining(), "dense", None, seed), data, device, compiler, max_eval, None
            )
            partial = path.with_suffix(".partial")
            torch.save({"model": model.state_dict(), "record": record}, partial)
            os.replace(partial, path)
    saved = torch.load(path, map_location=device, weights_only=True)
    record = {**saved["record"], "method": PRETRAIN, "cached": cached, "checkpoint": str(path)}
    return saved["model"], record


# --------------------------------------------------------------------------------------------------
# Running many trainings at once
# --------------------------------------------------------------------------------------------------


class _Worker:
    """Per-process state: the device, each task's data loaded once, recovery checkpoints."""

    def __init__(
        self,
        device: str,
        compiler: str,
        data_dir: str | None,
        max_eval: int | None,
        cache_dir: Path = DEFAULT_CACHE,
    ):
        self.device, self.compiler = torch.device(device), compiler
        self.data_dir, self.max_eval, self.cache_dir = data_dir, max_eval, Path(cache_dir)
        self.data: dict[Any, Any] = {}
        self.checkpoints: dict[tuple[str, int], tuple[dict[str, torch.Tensor], dict]] = {}

    def __call__(self, run: Run) -> dict[str, Any]:
        task = run.task
        if task.load not in self.data:
            self.data[task.load] = task.load(self.data_dir, self.device)
        data = self.data[task.load]
        initial = None
        if task.pretrain_steps:
            key = (task.name, run.seed)
            if key not in self.checkpoints:
                self.checkpoints[key] = pretrained(
                    task, run.seed, data, self.device, self.compiler, self.cache_dir, self.max_eval
                )
            initial, record = self.checkpoints[key]
            if run.method == PRETRAIN:
                return record
        return train_run(run, data, self.device, self.compiler, self.max_eval, initial)


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
    cache_dir: Path = DEFAULT_CACHE,
) -> list[dict[str, Any]]:
    """Every run's record (or ``{"error", "run"}``), in the order of ``runs``.

    ``workers == 1`` trains in this process, with the caller's intra-op thread count unless
    ``threads`` is given; more spawn that many processes fed from one queue, each with ``threads``
    intra-op threads (default: the cores shared out among the workers). ``on_record`` sees the
    records so far (None for runs not finished) after each run, e.g. to save partial results.
    A recovery task's runs of one seed share the dense checkpoint in ``cache_dir`` (trained by
    the first worker that needs it; a ``PRETRAIN`` run only makes sure it exists).
    """
    worker_args = (device, compiler, data_dir, max_eval, cache_dir)
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


def _recovery_check(
    chosen: Sequence[dict[str, Any]], std: float, higher_is_better: bool
) -> dict[str, Any]:
    """How much worse than just before its final prune each run ended (positive: worse), the
    worst of them, and whether that stays within the seed-to-seed spread ``std`` of the cell."""
    befores = [r.get("before_final_prune") for r in chosen]
    if not chosen or any(b is None for b in befores):
        return {"before_final_prune_mean": None, "worse_than_before_max": None, "recovers": None}
    sign = -1.0 if higher_is_better else 1.0
    worse = [sign * (r["metric"] - b["metric"]) for r, b in zip(chosen, befores, strict=True)]
    return {
        "before_final_prune_mean": statistics.fmean(b["metric"] for b in befores),
        "worse_than_before_max": max(worse),
        "recovers": max(worse) <= std,
    }


def summarize(
    task: Task, records: Sequence[dict[str, Any]], sparsities: Sequence[float]
) -> list[dict[str, Any]]:
    """Mean and std over seeds per (sparsity, method); dense appears at every sparsity. Cells with
    a final prune also say whether every run ended within the seed spread of its value just
    before that prune (``recovers``)."""
    ok = [r for r in records if "error" not in r and r["method"] != PRETRAIN]
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
            check = (
                _recovery_check(chosen, std, task.higher_is_better)
                if method not in (NO_RECOVERY, "dense")
                else _recovery_check([], std, task.higher_is_better)
            )
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
                    **check,
                }
            )
    return summary


def recovery_verdict(summary: Sequence[dict[str, Any]]) -> str:
    """One line: does every checked cell end within its seed spread of its pre-final-prune value?"""
    checked = [row for row in summary if row.get("recovers") is not None]
    failed = [f"{row['method']} s={row['sparsity']}" for row in checked if not row["recovers"]]
    if not checked:
        return "final vs before the final prune: no cell to check"
    if not failed:
        return (
            f"final vs before the final prune: every run of all {len(checked)} checked cells ends "
            "within the seed-to-seed spread of its value just before its final prune"
        )
    return (
        f"final vs before the final prune: {len(failed)} of {len(checked)} cells end worse than "
        f"just before their final prune by more than the seed spread: {', '.join(failed)}"
    )


def after_final_prune(row: dict[str, Any], digits: int) -> str:
    """The check's cell text: the worst run's change since just before its final prune."""
    if row.get("recovers") is None:
        return ""
    verdict = "ok" if row["recovers"] else "WORSE"
    return f"{verdict} ({row['worse_than_before_max']:+.{digits}f})"


def table(summary: Sequence[dict[str, Any]], higher_is_better: bool) -> str:
    digits = 2 if higher_is_better else 3
    rows = [
        {
            "sparsity": row["sparsity"],
            "method": row["method"],
            row["metric"]: f"{row['mean']:.{digits}f}"
            + (f" ± {row['std']:.{digits}f}" if len(row["seeds"]) > 1 else ""),
            "seeds": len(row["seeds"]),
            "after final prune": after_final_prune(row, digits),
            "resurrected": f"{row['resurrected_mean']:.0f}",
            "of them trained": f"{row['resurrected_trained_mean']:.0f}",
            "actual sparsity": f"{row['actual_sparsity_mean']:.4f}",
            "s / run": f"{row['seconds_mean']:.1f}",
        }
        for row in summary
    ]
    return tabulate(rows, headers="keys", disable_numparse=True)


# --------------------------------------------------------------------------------------------------
# Planning: variants, resuming, estimates
# --------------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes."""
    parts, depth, quoted, current = [], 0, False, []
    for char in text:
        if char == '"':
            quoted = not quoted
        elif not quoted and char in "[{(":
            depth += 1
        elif not quoted and char in "]})":
            depth -= 1
        if char == "," and depth == 0 and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,...`` -> (NAME, options): RESU (or ``method=...``) with those options,
    values as JSON where they parse (``theta_lr=1e-4``, ``exclude=["head.weight"]``) and as
    strings otherwise (``schedule=cubic``); validated by ``ResuConfig`` at once."""
    name, colon, body = text.partition(":")
    name = name.strip()
    if not colon or not name:
        raise argparse.ArgumentTypeError(f"--variant: expected NAME:KEY=VALUE,..., got {text!r}")
    if name in METHODS or name in (NO_RECOVERY, PRETRAIN):
        raise argparse.ArgumentTypeError(f"--variant: {name!r} is already a method label")
    options: dict[str, Any] = {"method": "resu"}
    for item in _split_top_level(body):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise argparse.ArgumentTypeError(f"--variant {name}: expected KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    try:
        resu.ResuConfig.from_options(options)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"--variant {name}: {exc}") from None
    return name, options


def label_options(record: Mapping[str, Any]) -> dict[str, Any]:
    """A finished run's label options: its compile options without those of the run itself
    (step budget, seed, compiler, sparsity), so a kept record still says what its label means."""
    per_run = {"total_steps", "seed", "compiler", "sparsity"}
    return {k: v for k, v in record["options"].items() if k not in per_run}


def resolved_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """Every option ``resu.compile`` resolves ``options`` to, defaults included, so that a
    changed library default makes a different run."""
    return json.loads(json.dumps(resu.ResuConfig.from_options(dict(options)).to_dict()))


def run_key(method: str, sparsity: float | None, seed: int, config: Mapping[str, Any]) -> str:
    """What makes two runs the same run: label, sparsity, seed and the resolved options that
    can change it (:meth:`ResuConfig.effective`)."""
    return json.dumps([method, sparsity, seed, resu.ResuConfig.effective(config)], sort_keys=True)


def record_key(record: Mapping[str, Any]) -> str | None:
    """The :func:`run_key` of a finished run's record (None for records from before the resolved
    options were recorded, which never match)."""
    if "config" not in record:
        return None
    return run_key(record["method"], record["sparsity"], record["seed"], record["config"])


@dataclass
class Resumption:
    """What ``--resume`` makes of an earlier file: the runs still to train and the records kept,
    with what it relabelled and what it dropped, so the run can say so."""

    todo: list[Run]
    kept: list[dict[str, Any]]
    #: (earlier label, planned label) of every record that now serves another label's run
    relabelled: list[tuple[str, str]]
    #: labels of records dropped because the label now resolves to other options
    stale: list[str]


def remaining(
    task: Task, runs: Sequence[Run], earlier: Sequence[dict[str, Any]], compiler: str
) -> Resumption:
    """``--resume``: which planned runs an earlier file already holds, matched by what they
    compute (sparsity, seed and resolved options), not by name.

    - A record serves every planned run of its sparsity, seed and resolved options (a dense one
      only if it evaluated every planned no-recovery sparsity). Under another label it moves to
      the planned label, its options rewritten to that label's and the old ones kept as
      ``relabelled_from``: after a default changes, a variant that spelled out the new default
      is the default's run, and the old default's runs serve a variant spelling out the old one.
    - A record serving no planned run is kept under its own label, unless that label is planned
      at its sparsity and seed (superseded: trained again) or is a built-in label that now
      resolves to other options (stale: a library default moved; dropped and reported).
    - Records from before the resolved options were recorded are kept only if not planned.
    """
    planned: dict[str, Run] = {}
    serving: dict[str, list[str]] = {}
    for run in runs:
        config = resolved_config(compile_options(run, compiler))
        key = run_key(run.method, run.sparsity, run.seed, config)
        planned[key] = run
        serving.setdefault(run_key("", run.sparsity, run.seed, config), []).append(key)
    slots = {(run.method, run.sparsity, run.seed) for run in runs}
    result = Resumption([], [], [], [])
    done: set[str] = set()
    for record in earlier:
        if "error" in record:
            continue
        slot = (record["method"], record["sparsity"], record["seed"])
        if "config" not in record:
            if slot not in slots:
                result.kept.append(record)
            continue
        content = run_key("", record["sparsity"], record["seed"], record["config"])
        served = False
        for key in serving.get(content, []):
            run = planned[key]
            if key in done or not all(
                str(s) in record.get("no_recovery", {}) for s in run.no_recovery
            ):
                continue
            if run.method == record["method"]:
                result.kept.append(record)
            else:
                result.kept.append(_relabelled(record, run, compiler))
                result.relabelled.append((record["method"], run.method))
            done.add(key)
            served = True
        if served or slot in slots:
            continue
        if _stale(task, record, compiler):
            result.stale.append(record["method"])
            continue
        result.kept.append(record)
    result.todo = [run for key, run in planned.items() if key not in done]
    return result


def _relabelled(record: Mapping[str, Any], run: Run, compiler: str) -> dict[str, Any]:
    """``record`` as the run of ``run``'s label: same results, that label's options."""
    options = json.loads(json.dumps(compile_options(run, compiler)))
    earlier = {"method": record["method"], "options": record.get("options")}
    return {**record, "method": run.method, "options": options, "relabelled_from": earlier}


def _stale(task: Task, record: Mapping[str, Any], compiler: str) -> bool:
    """Whether ``record`` is of a built-in label that today resolves to options that would change
    the run (at the record's sparsity and seed)."""
    if record["method"] not in METHODS:
        return False
    run = Run(task, record["method"], record["sparsity"], record["seed"])
    today = resolved_config(compile_options(run, compiler))
    return resu.ResuConfig.effective(record["config"]) != resu.ResuConfig.effective(today)


def estimate_seconds(
    task: Task, runs: Sequence[Run], workers: int, earlier: Mapping[str, Any] | None
) -> tuple[float, str]:
    """Wall seconds the plan should take, and where the per-run figure came from: the mean
    seconds per method of an earlier result of this task at the same step count when there is
    one, else ``task.step_ms`` per step. Runs share the workers evenly; a recovery task's
    pretraining comes first, its seeds in parallel."""
    per_method: dict[str, list[float]] = {}
    if earlier is not None and earlier.get("steps") == task.steps:
        for record in earlier.get("runs", []):
            per_method.setdefault(record["method"], []).append(record["seconds"])
    fallback = task.steps * task.step_ms / 1e3
    source = f"{task.step_ms:g} ms per step (task.step_ms)"
    if per_method:
        source = f"per-method seconds of {earlier.get('device', 'an earlier run')}'s result"
    total = sum(
        statistics.fmean(per_method[run.method]) if run.method in per_method else fallback
        for run in runs
    )
    pretrain = task.pretrain_steps * task.step_ms / 1e3
    return pretrain + total / max(1, workers), source


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _csv(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item.strip()]

    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--task", choices=sorted(TASKS), help="required unless --plot-only")
    parser.add_argument("--sparsities", type=_csv(float), default=[0.7, 0.9])
    parser.add_argument(
        "--methods",
        type=_csv(str),
        default=list(DEFAULT_METHODS),
        help=f"comma-separated labels of {list(METHODS)} (default: {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="an extra labelled method: RESU (or method=...) with these ResuConfig options, values "
        'parsed as JSON, e.g. resu-cubic:schedule=cubic or resu-head:exclude=["*lm_head*"] '
        "(repeatable)",
    )
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
        help="folder holding fashion-mnist/, kjv/ and sotu/ (default: $RESU_DATA, then "
        "../shared/data)",
    )
    parser.add_argument(
        "--max-eval",
        type=int,
        help="evaluate only N held-out images (the first) / windows (spread evenly), for smoke "
        "runs (default: all)",
    )
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/accuracy-<task>.json")
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="recovery tasks' pretrained checkpoints (default: .out/accuracy-cache)",
    )
    earlier = parser.add_mutually_exclusive_group()
    earlier.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in --out that a planned run would repeat (same sparsity, seed "
        "and resolved options; under another label they move to the planned one) and train only "
        "the others; built-in labels' runs under options they no longer resolve to are dropped",
    )
    earlier.add_argument(
        "--merge",
        type=Path,
        help="an earlier result JSON of this task: its runs of methods not run now (and still "
        "defined) are kept beside the new ones, e.g. to re-run only RESU after a change",
    )
    parser.add_argument(
        "--plot-only",
        type=Path,
        metavar="RESULTS.json",
        help="only draw the figure of an existing result (beside it, as .png) and exit",
    )
    args = parser.parse_args(argv)
    if args.plot_only is None and args.task is None:
        parser.error("--task is required (unless --plot-only)")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    names = [name for name, _ in args.variant]
    if len(set(names)) != len(names):
        parser.error(f"--variant names must differ, got {names}")
    if any(not 0.0 < s < 1.0 for s in args.sparsities):
        parser.error("sparsities must lie in (0, 1)")
    for name in ("steps", "batch_size", "workers", "threads", "max_eval"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def _sparsities(planned: Sequence[float], records: Sequence[dict[str, Any]]) -> list[float]:
    """The planned sparsities and those of the records kept from an earlier file, in order."""
    kept = {r["sparsity"] for r in records if r.get("sparsity") is not None}
    return sorted(set(planned) | kept)


def _load_earlier(path: Path, task: Task, flag: str) -> dict[str, Any]:
    earlier = json.loads(path.read_text())
    if earlier["task"] != task.name or earlier["steps"] != task.steps:
        raise SystemExit(f"{flag}: {path} is not a {task.name} run of {task.steps} steps")
    return earlier


def draw(result_path: Path, result: dict[str, Any]) -> None:
    """The task's figure beside its JSON; says so instead when matplotlib is missing."""
    from benchmarks import accuracy_plot

    try:
        figure = accuracy_plot.plot_result(result, result_path.with_suffix(".png"))
    except ImportError as exc:
        print(f"figure not drawn ({exc}): pip install -e '.[plot]'", flush=True)
        return
    print(f"figure written to {figure}", flush=True)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only is not None:
        draw(args.plot_only, json.loads(args.plot_only.read_text()))
        return 0
    argv = sys.argv[1:] if argv is None else list(argv)
    task = TASKS[args.task]
    task = dataclasses.replace(
        task, steps=args.steps or task.steps, batch_size=args.batch_size or task.batch_size
    )
    device = torch.device(args.device)
    compiler = args.compiler or ("inductor" if device.type == "cuda" else "aot_eager")
    workers = args.workers or (8 if device.type == "cuda" else 1)
    variants = dict(args.variant)
    out = args.out or ROOT / "benchmarks" / "results" / f"accuracy-{task.name}.json"
    runs = plan(task, args.methods, args.sparsities, args.seeds, variants)

    command = shlex.join(["python", "-m", "benchmarks.accuracy", *argv])
    kept: list[dict[str, Any]] = []
    commands, previous = [command], None
    if args.merge is not None:
        previous = _load_earlier(args.merge, task, "--merge")
        kept = [
            r
            for r in previous["runs"]
            if r["method"] in METHODS and r["method"] not in args.methods
        ]
    elif args.resume and out.exists():
        previous = _load_earlier(out, task, "--resume")
        resumed = remaining(task, runs, previous["runs"], compiler)
        runs, kept = resumed.todo, resumed.kept
        for before, after in sorted(set(resumed.relabelled)):
            count = resumed.relabelled.count((before, after))
            print(f"{count} runs of {before} serve {after}: the same resolved options", flush=True)
        for label in sorted(set(resumed.stale)):
            count = resumed.stale.count(label)
            print(f"{count} runs of {label} dropped: {label} now resolves to other options")
    if previous is not None:
        commands = [*previous.get("commands", [previous["command"]]), command]
    estimate, source = estimate_seconds(
        task, runs, workers, previous or (json.loads(out.read_text()) if out.exists() else None)
    )
    print(
        f"{len(runs)} runs of {task.steps} steps on {device} with {workers} workers"
        + (f" ({len(kept)} finished runs kept from {out})" if args.resume else "")
        + f"; estimate {estimate / 60:.1f} min from {source}",
        flush=True,
    )
    start = time.perf_counter()
    execute_args: dict[str, Any] = {
        "device": str(device),
        "compiler": compiler,
        "data_dir": args.data,
        "max_eval": args.max_eval,
        "log": lambda line: print(line, flush=True),
        "cache_dir": args.cache,
    }
    pretrain_records: list[dict[str, Any]] = []
    if task.pretrain_steps and runs:
        # Every seed's checkpoint first, in parallel, so that no worker waits for another's.
        seeds = sorted({run.seed for run in runs})
        parallel = min(workers, len(seeds))
        pretrain_records = execute(
            [Run(task, PRETRAIN, None, seed) for seed in seeds],
            workers=parallel,
            threads=args.threads or max(1, (os.cpu_count() or 1) // parallel),
            **execute_args,
        )

    runs_labels = list(dict.fromkeys(run.method for run in runs))

    def result_of(records: Sequence[dict[str, Any] | None], partial: bool) -> dict[str, Any]:
        done = kept + [r for r in records if r is not None]
        labels = dict.fromkeys(r["method"] for r in done)
        return {
            "task": task.name,
            **environment(),
            "transformers": _version("transformers"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "command": " && ".join(commands),
            "commands": commands,
            "partial": partial,
            "steps": task.steps,
            "pretrain_steps": task.pretrain_steps,
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
            "trace_limit": task.trace_limit,
            "schedule_fraction": SCHEDULE_FRACTION,
            "methods": {
                **{r["method"]: label_options(r) for r in done if "options" in r},
                **{
                    m: {**METHODS.get(m, {}), **variants.get(m, {})}
                    for m in labels
                    if m in runs_labels
                },
            },
            "wall_seconds": time.perf_counter() - start,
            "pretrained": [r for r in pretrain_records if "error" not in r],
            "runs": [r for r in done if "error" not in r],
            "errors": [r for r in [*pretrain_records, *done] if "error" in r],
            "summary": summarize(task, done, _sparsities(args.sparsities, done)),
        }

    records = execute(
        runs,
        workers=workers,
        threads=args.threads or max(1, (os.cpu_count() or 1) // workers),
        # Saved after every run, so a run cut short by a time limit still leaves its results.
        on_record=lambda so_far: write_json(out, result_of(so_far, partial=True)),
        **execute_args,
    )
    result = result_of(records, partial=False)
    write_json(out, result)
    errors, summary = result["errors"], result["summary"]
    for error in errors:
        print(f"\n{error['run']} failed:\n{error['error']}", file=sys.stderr)
    print(f"\n{len(result['runs'])} runs, {len(errors)} failed, in {result['wall_seconds']:.0f} s")
    print(f"written to {out}\n")
    print(f"{task.name}: {task.metric}, mean ± std over seeds, {task.steps} steps per run")
    print(table(summary, task.higher_is_better))
    print(recovery_verdict(summary))
    for record in result["runs"]:
        if record.get("before_final_prune_error"):
            print(
                f"{record['method']} s={record['sparsity']} seed={record['seed']}: no value before "
                f"the final prune ({record['before_final_prune_error']})"
            )
    draw(out, result)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
