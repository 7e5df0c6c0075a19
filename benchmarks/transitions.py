"""Cost of the mask transitions (prune, RESU entry, commit) per 100M managed weights.

The transitions run between steps, over every managed weight at once, so their cost is the
controller's own: no graph is involved. This benchmark builds GPT-2-small's 48 managed weights
(12 blocks of qkv 768x2304, attention out 768x768, MLP in 768x3072 and out 3072x768: 85M weights,
fp32 as under bf16 autocast) with a fused AdamW holding state for each, registers them with a
manual :class:`~resu_compile.runtime.controller.PhaseController` in the default configuration, and times full
cycles: prune, RESU entry, one theta step's worth of change, commit. A first cycle warms up CUDA's
lazy kernel loading; the table reports the median of the later cycles (``torch.cuda.synchronize``
on both sides, wall-clock) and, from one profiled cycle, the number of kernel launches and of
host-device synchronisations each transition makes, and its top CUDA kernels.

Usage (on the GPU machine): ``python -m benchmarks.transitions [--out
benchmarks/results/transitions.json] [--cycles 7] [--profile-dir DIR]``. The same transitions
inside a compiled model are timed by ``benchmarks/overhead.py``; this one isolates them.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from benchmarks.common import environment, timed_ms, write_json
from resu_compile.config import ResuConfig
from resu_compile.runtime.controller import PhaseController

SPARSITY = 0.7
TRANSITIONS = ("prune", "enter_resu", "commit")
# (name, shape (out, in)) of one GPT-2-small block's managed weights, as nn.Linear stores them.
BLOCK_SHAPES = (
    ("qkv", (2304, 768)),
    ("proj", (768, 768)),
    ("fc", (3072, 768)),
    ("out", (768, 3072)),
)
# Host-device synchronisations as the profiler names them.
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def build(layers: int, device: torch.device) -> tuple[PhaseController, torch.optim.Optimizer]:
    """GPT-2-small-shaped managed weights with AdamW state, under a manual controller."""
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(shape, device=device) * 0.02)
        for _ in range(layers)
        for _, shape in BLOCK_SHAPES
    ]
    names = [f"h.{i}.{name}.weight" for i in range(layers) for name, _ in BLOCK_SHAPES]
    controller = PhaseController(ResuConfig(sparsity=SPARSITY, manual=True))
    for param, name in zip(params, names, strict=True):
        controller.state.register(param, name).input_dim = 1
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda")
    _fake_step(params, optimizer)
    controller.attach(optimizer)
    return controller, optimizer


def _fake_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step on random gradients: creates the state and moves theta off its draw."""
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _cycle(controller: PhaseController, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One prune / RESU entry / commit, each timed; a step between entry and commit."""
    params = [w.param for w in controller.state]
    times = {"prune": timed_ms(lambda: controller.prune(SPARSITY))}
    times["enter_resu"] = timed_ms(controller.enter_resu)
    _fake_step(params, optimizer)
    times["commit"] = timed_ms(controller.commit)
    return times


def _profile(
    controller: PhaseController, optimizer: torch.optim.Optimizer, profile_dir: Path | None
) -> dict[str, dict[str, Any]]:
    """Kernel launches, host syncs and the top kernels of each transition of one cycle."""
    params = [w.param for w in controller.state]
    steps: dict[str, Callable[[], None]] = {
        "prune": lambda: controller.prune(SPARSITY),
        "enter_resu": controller.enter_resu,
        "commit": controller.commit,
    }
    out = {}
    for name, fn in steps.items():
        if name == "commit":
            _fake_step(params, optimizer)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))
        syncs = sum(e.count for e in events if e.key in SYNC_EVENTS)
        kernels = sorted(
            (e for e in events if e.device_time_total > 0 and e.key[:4] not in ("aten", "cuda")),
            key=lambda e: -e.device_time_total,
        )
        out[name] = {
            "kernel_launches": launches,
            "host_syncs": syncs,
            "top_kernels": [
                {"kernel": e.key[:80], "calls": e.count, "device_ms": e.device_time_total / 1e3}
                for e in kernels[:8]
            ],
        }
        if profile_dir is not None:
            table = events.table(sort_by="self_cpu_time_total", row_limit=40)
            (profile_dir / f"transition-{name}.txt").write_text(table)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/transitions.json"))
    parser.add_argument("--cycles", type=int, default=7, help="timed cycles after the warm-up")
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (12: GPT-2-small)")
    parser.add_argument("--profile-dir", type=Path, help="also write full profiler tables here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/transitions.py needs a CUDA GPU")
    controller, optimizer = build(args.layers, torch.device("cuda"))
    managed = sum(w.numel for w in controller.state)
    first = _cycle(controller, optimizer)  # includes CUDA's lazy loading of every kernel
    cycles = [_cycle(controller, optimizer) for _ in range(args.cycles)]
    profile = _profile(controller, optimizer, args.profile_dir)
    per_100m = 1e8 / managed
    rows = [
        {
            "transition": name,
            "ms": statistics.median(c[name] for c in cycles),
            "ms/100M": statistics.median(c[name] for c in cycles) * per_100m,
            "first cycle ms/100M": first[name] * per_100m,
            "kernel launches": profile[name]["kernel_launches"],
            "host syncs": profile[name]["host_syncs"],
        }
        for name in TRANSITIONS
    ]
    result = {
        **environment(),
        "command": "python -m benchmarks.transitions",
        "managed_weights": managed,
        "weights": len(controller.state),
        "sparsity": SPARSITY,
        "cycles": cycles,
        "first_cycle": first,
        "profile": profile,
        "summary": rows,
    }
    write_json(args.out, result)
    for name in TRANSITIONS:
        print(f"\n{name}: top kernels")
        print(tabulate(profile[name]["top_kernels"], headers="keys", floatfmt=".3f"))
    print(f"\n{result['device']}  torch {result['torch']}  triton {result['triton']}")
    print(f"{len(controller.state)} managed weights, {managed / 1e6:.1f}M; target 20 ms/100M")
    print(tabulate(rows, headers="keys", floatfmt=".3g"))


if __name__ == "__main__":
    main()
