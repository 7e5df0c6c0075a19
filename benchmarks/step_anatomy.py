"""Where a training step's time goes: resu.compile against dense torch.compile, phase by phase.

``benchmarks/overhead.py`` says *how much* a phase costs against dense; this one says *where*. For
one model it builds a dense ``torch.compile`` trainer and a ``resu.compile`` trainer (one per
``--modes`` entry) in one process, and for each phase of ours (before the first prune, sparse,
RESU; the calibrate forward against dense's forward) it measures, beside the same number of dense
steps alternated with ours:

- wall-clock step time (median of synchronised steps) and its ratio to dense: the median, and
  quartiles, of the ratios of alternated blocks (the host's speed drifts between blocks);
- host time of each part of a step, timed without syncing (forward call, backward call, optimizer
  step): where the CPU is while the GPU works; the GPU waits only if the host falls behind it;
- a cProfile of the optimizer step, ours and torch's;
- GPU kernel time per step from the profiler, in total and for the kernels that differ most from
  dense, and the host syncs issued (``cudaStreamSynchronize`` and friends).

It then times a few full prune / RESU entry / commit cycles with the garbage-collection pauses,
Triton compilations, new allocator segments and allocator retries inside each, and
(``--profile-commits N``) profiles N commits, keeping the slowest and the fastest: commit times
inside a compiled process were seen to vary tenfold. Usage (GPU machine):

    python -m benchmarks.step_anatomy --model vit [--modes resu,resu:graph-mask]
        [--profile-commits 8] [--out benchmarks/results/step_anatomy-vit.json]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import itertools
import pstats
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import triton
from tabulate import tabulate
from torch.autograd import DeviceType

from benchmarks.common import alternated, environment, timed_ms, write_json
from benchmarks.overhead import RESU_MODES, SPARSITY, Trainer

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


class GcPauses:
    """Collects the duration of every garbage collection while installed (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.pauses_ms: list[float] = []
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses_ms.append((time.perf_counter() - self._start) * 1e3)

    @contextmanager
    def installed(self) -> Iterator[GcPauses]:
        gc.callbacks.append(self)
        try:
            yield self
        finally:
            gc.callbacks.remove(self)


def _host_parts(trainer: Trainer, steps: int) -> dict[str, float]:
    """Median host milliseconds of each part of a step (no sync inside the step)."""
    parts: dict[str, list[float]] = {}
    for _ in range(steps):
        marks: list[tuple[str, float]] = []
        torch.cuda.synchronize()
        trainer.step(marks)
        torch.cuda.synchronize()
        for (_, before), (name, after) in itertools.pairwise(marks):
            parts.setdefault(name, []).append((after - before) * 1e3)
    return {name: statistics.median(values) for name, values in parts.items()}


def _python_profile(trainer: Trainer, steps: int, top: int) -> str:
    """cProfile of ``steps`` optimizer steps (ours or torch's), the ``top`` entries by cumulative
    time: which Python the host runs while the GPU waits for the update."""
    trainer.step()
    profiler = cProfile.Profile()
    for _ in range(steps):
        trainer.loss().backward()
        torch.cuda.synchronize()
        profiler.enable()
        trainer.optimizer_step()
        profiler.disable()
        trainer.optimizer.zero_grad(set_to_none=True)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def _kernel_profile(fn: Callable[[], None], steps: int) -> dict[str, Any]:
    """GPU kernel milliseconds per step (total and by kernel name) and host syncs per step."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels: Counter[str] = Counter()
    launches = 0
    syncs: Counter[str] = Counter()
    for event in prof.events():
        # GPU-side ranges of record_function annotations (e.g. "Optimizer.step#AdamW.step")
        # would count their kernels twice.
        if event.device_type == DeviceType.CUDA and not event.is_user_annotation:
            kernels[event.name[:80]] += event.device_time / 1e3 / steps
            launches += 1
        elif event.name in SYNC_CALLS:
            syncs[event.name] += 1
    return {
        "kernel_ms": sum(kernels.values()),
        "launches": launches / steps,
        "syncs": {name: count / steps for name, count in syncs.items()},
        "kernels": dict(kernels.most_common()),
    }


def _against_dense(
    ours: Callable[[], None],
    dense: Callable[[], None],
    dense_profile: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Alternated timing and kernel profile of ``ours`` beside the same call of dense, with the
    kernels whose time differs most from dense's."""
    timing = alternated(ours, dense, args.rounds, args.block)
    profile = _kernel_profile(ours, args.profile_steps)
    differing = {
        kernel: ms - dense_profile["kernels"].get(kernel, 0.0)
        for kernel, ms in profile["kernels"].items()
    }
    for kernel, ms in dense_profile["kernels"].items():
        differing.setdefault(kernel, -ms)
    top = sorted(differing.items(), key=lambda item: -abs(item[1]))[: args.top]
    return {"timing": timing, "profile": profile, "kernels_vs_dense_ms": dict(top)}


def _phase(
    name: str,
    ours: Trainer,
    dense: Trainer,
    dense_profile: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    return {
        "phase": name,
        **_against_dense(ours.step, dense.step, dense_profile, args),
        "host_ms": _host_parts(ours, args.profile_steps),
        "python_profile": _python_profile(ours, args.profile_steps, args.top * 4),
    }


def _calibrate_phase(
    ours: Trainer, dense: Trainer, dense_forward_profile: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The calibrate variant's forward (Wanda's input norms) against dense's forward."""
    with ours.compiled.resu.calibrate():
        measured = _against_dense(
            ours.forward_only, dense.forward_only, dense_forward_profile, args
        )
    return {"phase": "calibrate (forward)", **measured, "host_ms": {}}


class TritonCompiles:
    """Counts Triton kernel compilations while installed (``knobs.runtime.jit_post_compile_hook``;
    None where this Triton has no such hook)."""

    def __init__(self) -> None:
        self.count: int | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.count = (self.count or 0) + 1

    @contextmanager
    def installed(self) -> Iterator[TritonCompiles]:
        runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
        if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
            yield self
            return
        previous, runtime.jit_post_compile_hook = runtime.jit_post_compile_hook, self
        self.count = 0
        try:
            yield self
        finally:
            runtime.jit_post_compile_hook = previous


def _commit_profiles(trainer: Trainer, count: int) -> dict[str, Any]:
    """``count`` cycles with every commit under the profiler: the commits' milliseconds and the
    profiler table of the slowest against that of the fastest (where a slow one spends it)."""
    controller = trainer.compiled.resu
    runs = []
    for _ in range(count):
        controller.prune(SPARSITY)
        trainer.step()
        controller.enter_resu()
        trainer.step()
        torch.cuda.synchronize()
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            ms = timed_ms(controller.commit)
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
        runs.append((ms, table))
    ordered = sorted(runs, key=lambda run: run[0])
    return {
        "commit_ms": [ms for ms, _ in runs],
        "slowest": ordered[-1][1],
        "fastest": ordered[0][1],
    }


def _cycles(trainer: Trainer, count: int) -> list[dict[str, float]]:
    """Prune, RESU entry and commit times (ms per 100M weights), with the GC pauses, Triton
    compilations, new allocator segments and allocator retries during each."""
    controller = trainer.compiled.resu
    per_100m = 1e8 / sum(w.numel for w in controller.state)
    rows = []
    for cycle in range(count):
        row: dict[str, float] = {"cycle": cycle}
        for name, transition in (
            ("prune", lambda: controller.prune(SPARSITY)),
            ("enter_resu", controller.enter_resu),
            ("commit", controller.commit),
        ):
            before = torch.cuda.memory_stats()
            with GcPauses().installed() as pauses, TritonCompiles().installed() as compiles:
                row[f"{name} ms/100M"] = timed_ms(transition) * per_100m
            row[f"{name} compiles"] = compiles.count
            after = torch.cuda.memory_stats()
            row[f"{name} gc ms"] = sum(pauses.pauses_ms)
            # cudaMalloc calls (new segments) and allocator retries (cudaFree + sync) inside it.
            for label, stat in (
                ("cudaMallocs", "segment.all.allocated"),
                ("retries", "num_alloc_retries"),
            ):
                row[f"{name} {label}"] = after.get(stat, 0) - before.get(stat, 0)
            if name != "commit":
                trainer.step()
        rows.append(row)
    return rows


def _mode(
    mode: str, dense: Trainer, dense_profiles: dict[str, Any], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, float]], dict[str, Any] | None]:
    """The phases of one resu mode against ``dense`` (``dense_profiles``: its step's and its
    forward's), its transition cycles, and (with ``--profile-commits``) its commit profiles."""
    ours = Trainer(args.model, mode)
    ours.step()
    controller = ours.compiled.resu
    phases = []
    for name, enter in (
        ("before prune", lambda: None),
        ("sparse", lambda: controller.prune(SPARSITY)),
        ("resu", controller.enter_resu),
    ):
        enter()
        phases.append({"mode": mode, **_phase(name, ours, dense, dense_profiles["step"], args)})
    phases.append({"mode": mode, **_calibrate_phase(ours, dense, dense_profiles["forward"], args)})
    controller.commit()
    cycles = _cycles(ours, args.cycles)
    profiles = _commit_profiles(ours, args.profile_commits) if args.profile_commits else None
    return phases, cycles, profiles


def _dense_side(phase: dict[str, Any], dense_profiles: dict[str, Any]) -> dict[str, Any]:
    """The dense profile a phase is compared with: the forward for calibrate, else the step."""
    return dense_profiles["forward" if phase["phase"].startswith("calibrate") else "step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gpt2", "vit"), default="vit")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--modes",
        default="resu",
        help="comma list of overhead.py's resu modes: " + ", ".join(RESU_MODES),
    )
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--top", type=int, default=8, help="kernels listed per phase")
    parser.add_argument(
        "--profile-commits", type=int, default=0, help="cycles whose commit runs under the profiler"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/step_anatomy.py needs a CUDA GPU")
    out = args.out or Path(f"benchmarks/results/step_anatomy-{args.model}.json")

    dense = Trainer(args.model, "dense")
    dense.step()
    dense_profile = _kernel_profile(dense.step, args.profile_steps)
    dense_profiles = {
        "step": dense_profile,
        "forward": _kernel_profile(dense.forward_only, args.profile_steps),
    }
    phases, cycles, commit_profiles = [], {}, {}
    for mode in args.modes.split(","):
        mode_phases, cycles[mode], commit_profiles[mode] = _mode(mode, dense, dense_profiles, args)
        phases += mode_phases

    result = {
        **environment(),
        "model": args.model,
        "dense": {
            "host_ms": _host_parts(dense, args.profile_steps),
            "python_profile": _python_profile(dense, args.profile_steps, args.top * 4),
            "profile": dense_profile,
            "forward_profile": dense_profiles["forward"],
        },
        "phases": phases,
        "cycles": cycles,
        "commit_profiles": commit_profiles,
    }
    write_json(out, result)
    rows = [
        {
            "mode": p["mode"],
            "phase": p["phase"],
            "ms": p["timing"]["ms"],
            "dense ms": p["timing"]["dense_ms"],
            "x dense": p["timing"]["ratio"],
            "x p25": p["timing"]["ratio_p25"],
            "x p75": p["timing"]["ratio_p75"],
            "kernel ms": p["profile"]["kernel_ms"],
            "dense kernel ms": _dense_side(p, dense_profiles)["kernel_ms"],
            "launches": p["profile"]["launches"],
            "dense launches": _dense_side(p, dense_profiles)["launches"],
            **{f"host {k}": v for k, v in p["host_ms"].items()},
        }
        for p in phases
    ]
    print(
        f"{result['device']}  torch {result['torch']}  triton {result['triton']}  {result['date']}"
    )
    print("dense host ms:", {k: round(v, 2) for k, v in result["dense"]["host_ms"].items()})
    for p in phases:
        print(f"\n{p['mode']} {p['phase']}: kernels against dense (ms per step)")
        print(tabulate(list(p["kernels_vs_dense_ms"].items()), floatfmt="+.3f"))
    for mode, profiles in commit_profiles.items():
        if profiles:
            print(f"\n{mode}: commits under the profiler, ms: {profiles['commit_ms']}")
            print(f"slowest:\n{profiles['slowest']}\nfastest:\n{profiles['fastest']}")
    for mode, mode_cycles in cycles.items():
        print(f"\n{mode}: transitions")
        print(tabulate(mode_cycles, headers="keys", floatfmt=".3g"))
    print()
    print(tabulate(rows, headers="keys", floatfmt=".4g"))


if __name__ == "__main__":
    main()
