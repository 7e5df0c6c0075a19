"""Where a training step's time goes: resu.compile against dense torch.compile, phase by phase.

``benchmarks/overhead.py`` says *how much* a phase costs against dense; this one says *where*. For
one model it builds a dense ``torch.compile`` trainer and a ``resu.compile`` trainer in one
process, and for each phase of ours (before the first prune, sparse, RESU) it measures, beside the
same number of dense steps alternated with ours:

- wall-clock step time (median and 90th percentile of synchronised steps);
- host time of each part of a step, timed without syncing (forward call, backward call, optimizer
  step): where the CPU is while the GPU works; the GPU waits only if the host falls behind it;
- GPU kernel time per step from the profiler, in total and for the kernels that differ most from
  dense, and the host syncs issued (``cudaStreamSynchronize`` and friends);
- garbage-collection pauses during the timed steps.

It then times a few full prune / RESU entry / commit cycles with their collection pauses, since
commit times inside a compiled process were seen to vary tenfold. Usage (GPU machine):

    python -m benchmarks.step_anatomy --model vit [--out benchmarks/results/step_anatomy-vit.json]
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
from tabulate import tabulate
from torch.autograd import DeviceType

from benchmarks.common import environment, timed_ms, write_json
from benchmarks.overhead import SPARSITY, Trainer

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


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


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
        inputs, target = trainer.batch()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = trainer.loss_fn(trainer.compiled(inputs), target)
        loss.backward()
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
        if event.device_type == DeviceType.CUDA:
            kernels[event.name[:80]] += event.device_time / 1e3 / steps
            launches += 1
        elif event.name in SYNC_CALLS or event.name.startswith("cudaMemcpy"):
            syncs[event.name] += 1
    return {
        "kernel_ms": sum(kernels.values()),
        "launches": launches / steps,
        "syncs": {name: count / steps for name, count in syncs.items()},
        "kernels": dict(kernels.most_common()),
    }


def _timed_blocks(
    ours: Callable[[], None], dense: Callable[[], None], rounds: int, block: int
) -> dict[str, Any]:
    """Alternating blocks of ours and dense: step times, and GC pauses during each side."""
    for _ in range(2):
        ours()
        dense()
    times: dict[str, list[float]] = {"ours": [], "dense": []}
    gc_ms = {"ours": 0.0, "dense": 0.0}
    gc_count = {"ours": 0, "dense": 0}
    for _ in range(rounds):
        for side, fn in (("ours", ours), ("dense", dense)):
            with GcPauses().installed() as pauses:
                times[side] += [timed_ms(fn) for _ in range(block)]
            gc_ms[side] += sum(pauses.pauses_ms)
            gc_count[side] += len(pauses.pauses_ms)
    steps = rounds * block
    return {
        side: {
            "median_ms": statistics.median(times[side]),
            "p90_ms": _percentile(times[side], 0.9),
            "min_ms": min(times[side]),
            "gc_ms_per_step": gc_ms[side] / steps,
            "gc_per_step": gc_count[side] / steps,
        }
        for side in times
    }


def _phase(
    name: str,
    ours: Trainer,
    dense: Trainer,
    dense_profile: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    timing = _timed_blocks(ours.step, dense.step, args.rounds, args.block)
    profile = _kernel_profile(ours.step, args.profile_steps)
    differing = {
        kernel: ms - dense_profile["kernels"].get(kernel, 0.0)
        for kernel, ms in profile["kernels"].items()
    }
    for kernel, ms in dense_profile["kernels"].items():
        differing.setdefault(kernel, -ms)
    top = sorted(differing.items(), key=lambda item: -abs(item[1]))[: args.top]
    return {
        "phase": name,
        "timing": timing,
        "host_ms": _host_parts(ours, args.profile_steps),
        "python_profile": _python_profile(ours, args.profile_steps, args.top * 4),
        "profile": profile,
        "kernels_vs_dense_ms": dict(top),
    }


def _cycles(trainer: Trainer, count: int) -> list[dict[str, float]]:
    """Prune, RESU entry and commit times (ms per 100M weights), with the GC pauses, new
    allocator segments and allocator retries during each."""
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
            with GcPauses().installed() as pauses:
                row[f"{name} ms/100M"] = timed_ms(transition) * per_100m
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gpt2", "vit"), default="vit")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--top", type=int, default=8, help="kernels listed per phase")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/step_anatomy.py needs a CUDA GPU")
    out = args.out or Path(f"benchmarks/results/step_anatomy-{args.model}.json")

    dense = Trainer(args.model, "dense")
    ours = Trainer(args.model, "resu")
    dense.step()
    ours.step()
    dense_profile = _kernel_profile(dense.step, args.profile_steps)
    controller = ours.compiled.resu
    phases = [_phase("before prune", ours, dense, dense_profile, args)]
    controller.prune(SPARSITY)
    phases.append(_phase("sparse", ours, dense, dense_profile, args))
    controller.enter_resu()
    phases.append(_phase("resu", ours, dense, dense_profile, args))
    controller.commit()
    cycles = _cycles(ours, args.cycles)

    result = {
        **environment(),
        "model": args.model,
        "dense": {
            "host_ms": _host_parts(dense, args.profile_steps),
            "python_profile": _python_profile(dense, args.profile_steps, args.top * 4),
            "profile": dense_profile,
        },
        "phases": phases,
        "cycles": cycles,
    }
    write_json(out, result)
    rows = [
        {
            "phase": p["phase"],
            "ms": p["timing"]["ours"]["median_ms"],
            "dense ms": p["timing"]["dense"]["median_ms"],
            "x dense": p["timing"]["ours"]["median_ms"] / p["timing"]["dense"]["median_ms"],
            "p90 ms": p["timing"]["ours"]["p90_ms"],
            "dense p90": p["timing"]["dense"]["p90_ms"],
            "kernel ms": p["profile"]["kernel_ms"],
            "dense kernel ms": dense_profile["kernel_ms"],
            "launches": p["profile"]["launches"],
            "dense launches": dense_profile["launches"],
            "syncs": sum(p["profile"]["syncs"].values()),
            "gc ms/step": p["timing"]["ours"]["gc_ms_per_step"],
            **{f"host {k}": v for k, v in p["host_ms"].items()},
        }
        for p in phases
    ]
    print(
        f"{result['device']}  torch {result['torch']}  triton {result['triton']}  {result['date']}"
    )
    print("dense host ms:", {k: round(v, 2) for k, v in result["dense"]["host_ms"].items()})
    for p in phases:
        print(f"\n{p['phase']}: kernels against dense (ms per step)")
        print(tabulate(list(p["kernels_vs_dense_ms"].items()), floatfmt="+.3f"))
        print("syncs/step:", p["profile"]["syncs"])
        print(p["python_profile"][:6000])
    print()
    print(tabulate(cycles, headers="keys", floatfmt=".3g"))
    print()
    print(tabulate(rows, headers="keys", floatfmt=".4g"))


if __name__ == "__main__":
    main()
