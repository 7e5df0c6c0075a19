"""Graph-level overhead of resu.compile against dense torch.compile (Inductor), per phase.

For a GPT-2-small-sized decoder and a ViT-B-sized encoder (bf16 autocast, fused AdamW) it measures
step time (median wall-clock of synchronised steps after warm-up), peak memory, compile time,
graphs compiled, graph breaks, recompiles in steady state, and the cost of each transition (prune,
RESU entry, commit) per 100M managed weights.

Each configuration runs in its own process with fresh Inductor / Triton caches, so compile times
are cold and memory peaks are not polluted by another model. Usage (GPU machine):

    python benchmarks/overhead.py [--out benchmarks/results/overhead.json] [--steps 30]
        [--models gpt2,vit] [--modes dense,resu,...] [--merge EARLIER.json]

With ``RESU_PROFILE_DIR=DIR`` set, profiler tables of the first transitions and of one step per
phase (and of the dense baseline's step) are written to DIR.

``--merge`` keeps the earlier result's runs of the (model, mode) pairs not run again now, so the
benchmark can be split over several calls (``--models gpt2``, then ``--models vit --merge
benchmarks/results/overhead.json``); ``commands`` lists the calls behind the result, earliest
first, and every run records its own ``date``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import alternated, environment, timed_ms, write_json
from benchmarks.models import GPT, GPT2_SMALL, VIT_BASE, ViT

SPARSITY = 0.7
MODELS = ("gpt2", "vit")
# resu.compile configurations measured against dense; "resu" is the default configuration, the
# others name the option they set (the default's own value included, so a row's meaning does not
# depend on which value is the default).
RESU_MODES = {
    "resu": {},
    "resu:optimizer-mask": {"gradient_mask": "optimizer"},
    "resu:graph-mask": {"gradient_mask": "graph"},
    "resu:consistency": {"selection": "consistency"},
}
MODES = ("dense", *RESU_MODES)


def _build(
    model_name: str,
) -> tuple[torch.nn.Module, Callable[[], tuple], Callable[[Any, Any], torch.Tensor]]:
    """Model on the GPU, a batch maker and the loss."""
    torch.manual_seed(0)
    if model_name == "gpt2":
        vocab, context, batch = 50304, 1024, 8
        model = GPT(GPT2_SMALL, vocab, context).cuda()
        tokens = torch.randint(0, vocab, (batch, context + 1), device="cuda")

        def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out.flatten(0, 1).float(), target.flatten())

        return model, lambda: (tokens[:, :-1], tokens[:, 1:]), loss
    model = ViT(VIT_BASE, image=224, patch=16, channels=3, classes=1000).cuda()
    images = torch.randn(64, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (64,), device="cuda")
    return model, lambda: (images, labels), lambda out, target: F.cross_entropy(out.float(), target)


class Trainer:
    """One training step (forward, backward, optimizer) with bf16 autocast."""

    def __init__(self, model_name: str, mode: str) -> None:
        self.model, self.batch, self.loss_fn = _build(model_name)
        self.mode = mode
        if mode == "dense":
            self.compiled = torch.compile(self.model)
        else:
            import resu_compile as resu

            self.compiled = resu.compile(
                self.model, sparsity=SPARSITY, manual=True, compiler="inductor", **RESU_MODES[mode]
            )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, weight_decay=0.01, fused=True
        )

    def step(self, marks: list[tuple[str, float]] | None = None) -> None:
        """One step; ``marks`` (if given) gets the host clock after each part, named."""

        def mark(name: str) -> None:
            if marks is not None:
                marks.append((name, time.perf_counter()))

        mark("start")
        loss = self.loss()
        mark("forward")
        loss.backward()
        mark("backward")
        self.optimizer_step()
        mark("optimizer")
        self.optimizer.zero_grad(set_to_none=True)
        mark("zero_grad")

    def optimizer_step(self) -> None:
        if self.mode == "dense":
            self.optimizer.step()
        else:
            self.compiled.resu.step(self.optimizer)

    def loss(self) -> torch.Tensor:
        """The forward pass of one batch under bf16 autocast, to its loss."""
        inputs, target = self.batch()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return self.loss_fn(self.compiled(inputs), target)

    def forward_only(self) -> None:
        inputs, _ = self.batch()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            self.compiled(inputs)


def _measure(fn: Callable[[], None], steps: int, warmup: int = 5) -> dict[str, float]:
    """Median ms of ``steps`` synchronised calls after ``warmup``, and the peak memory they reach."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = [timed_ms(fn) for _ in range(steps)]
    return {
        "ms": statistics.median(times),
        "ms_spread": (max(times) - min(times)) / 2,
        "peak_MiB": torch.cuda.max_memory_allocated() / 2**20,
    }


PROFILE_DIR = os.environ.get("RESU_PROFILE_DIR")


def _profiled_ms(fn: Callable[[], None], name: str) -> float:
    """Milliseconds of one call (a transition, a step); with $RESU_PROFILE_DIR set, also a
    profiler table of it in that folder."""
    profile_dir = PROFILE_DIR
    if not profile_dir:
        return timed_ms(fn)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        ms = timed_ms(fn)
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
    Path(profile_dir, f"{name}.txt").write_text(table)
    return ms


def _dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def worker(model_name: str, mode: str, steps: int) -> dict[str, Any]:
    """Everything measured for one (model, mode) in this process."""
    trainer = Trainer(model_name, mode)
    result: dict[str, Any] = {"model": model_name, "mode": mode}
    result["compile_s"] = timed_ms(trainer.step) / 1e3  # first step: Dynamo + Inductor, fw and bw
    if mode == "dense":
        result["phases"] = {
            "dense": _measure(trainer.step, steps),
            "forward": _measure(trainer.forward_only, steps),
        }
        result.update(_dynamo_counts())
        return result
    controller = trainer.compiled.resu
    managed = sum(w.numel for w in controller.state)
    result["managed_weights"] = managed
    per_100m = 1e8 / managed
    phases: dict[str, Any] = {"dense (before prune)": _measure(trainer.step, steps)}
    transitions = {
        "prune": _profiled_ms(lambda: controller.prune(SPARSITY), f"{model_name}-prune") * per_100m
    }
    phases["sparse"] = _measure(trainer.step, steps)
    transitions["enter_resu"] = _profiled_ms(controller.enter_resu, f"{model_name}-resu") * per_100m
    phases["resu"] = _measure(trainer.step, steps)
    transitions["commit"] = _profiled_ms(controller.commit, f"{model_name}-commit") * per_100m
    with controller.calibrate():
        result["calibrate_compile_s"] = timed_ms(trainer.forward_only) / 1e3
        phases["calibrate (forward)"] = _measure(trainer.forward_only, steps)
    result.update(_dynamo_counts())
    # Steady state: a full cycle through every variant must compile nothing new.
    with torch.compiler.set_stance("fail_on_recompile"):
        controller.prune(SPARSITY)
        trainer.step()
        controller.enter_resu()
        trainer.step()
        with controller.calibrate():
            trainer.forward_only()
        controller.commit()
        trainer.step()
    result["steady_state_recompiles"] = _dynamo_counts()["graphs"] - result["graphs"]
    result["phases"] = phases
    result["transitions_ms_per_100M"] = transitions
    result["interleaved"] = _interleaved_phases(model_name, trainer)
    return result


def _interleaved_phases(model_name: str, trainer: Trainer) -> dict[str, Any]:
    """Each phase of ``trainer`` against a dense torch.compile model built in this process.

    Transitions are timed again here: the first ones in a process also pay CUDA's lazy loading of
    every kernel they use, which later cycles do not.
    """
    baseline = Trainer(model_name, "dense")
    baseline.step()  # compile
    controller = trainer.compiled.resu
    per_100m = 1e8 / sum(w.numel for w in controller.state)
    steady = {"prune": timed_ms(lambda: controller.prune(SPARSITY)) * per_100m}
    out: dict[str, Any] = {"sparse": alternated(trainer.step, baseline.step)}
    if PROFILE_DIR:  # one step of each, where a phase's cost against dense would show
        _profiled_ms(trainer.step, f"{model_name}-sparse-step")
        _profiled_ms(baseline.step, f"{model_name}-dense-step")
    steady["enter_resu"] = timed_ms(controller.enter_resu) * per_100m
    out["resu"] = alternated(trainer.step, baseline.step)
    if PROFILE_DIR:
        _profiled_ms(trainer.step, f"{model_name}-resu-step")
    steady["commit"] = timed_ms(controller.commit) * per_100m
    with controller.calibrate():
        out["calibrate (forward)"] = alternated(trainer.forward_only, baseline.forward_only)
    out["transitions_steady_ms_per_100M"] = steady
    return out


def _run_worker(model_name: str, mode: str, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ)
        env.update(
            TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor",
            TRITON_CACHE_DIR=f"{cache}/triton",
            TORCHINDUCTOR_FX_GRAPH_CACHE="0",
            TORCHINDUCTOR_AUTOGRAD_CACHE="0",
        )
        command = [
            sys.executable,
            __file__,
            "--worker",
            f"{model_name}/{mode}",
            "--steps",
            str(steps),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {model_name}:{mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _order(run: dict[str, Any]) -> tuple[int, int, str, str]:
    """Table order: MODELS, then MODES; unknown names after, alphabetically."""
    model, mode = run["model"], run["mode"]
    return (
        MODELS.index(model) if model in MODELS else len(MODELS),
        MODES.index(mode) if mode in MODES else len(MODES),
        model,
        mode,
    )


def merge_runs(earlier: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The union of two lists of runs, a new run replacing an earlier one of the same (model,
    mode), in table order."""
    fresh = {(r["model"], r["mode"]) for r in new}
    kept = [r for r in earlier if (r["model"], r["mode"]) not in fresh]
    return sorted(kept + list(new), key=_order)


def load_earlier(
    path: Path, env: dict[str, Any], steps: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """The runs and command lines of an earlier result to merge with; each run is given the
    earlier result's date if it has none of its own. Refuses a result measured otherwise
    (sparsity, steps, device, torch or triton), whose numbers could not share one table."""
    earlier = json.loads(path.read_text())
    mine = {"sparsity": SPARSITY, "steps": steps, **env}
    differ = [
        f"{key} {earlier.get(key)!r} != {mine[key]!r}"
        for key in ("sparsity", "steps", "device", "torch", "triton")
        if earlier.get(key) != mine[key]
    ]
    if differ:
        raise SystemExit(f"--merge: {path} was measured otherwise: " + "; ".join(differ))
    runs = [{**run, "date": run.get("date") or earlier["date"]} for run in earlier["runs"]]
    commands = earlier.get("commands") or [
        earlier.get("command") or "python benchmarks/overhead.py"
    ]
    return runs, list(commands)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, phase): time and memory as ratios against dense in the same run."""
    rows = []
    for model_name in MODELS:
        dense = next((r for r in runs if r["model"] == model_name and r["mode"] == "dense"), None)
        if dense is None:
            continue
        for resu_run in (r for r in runs if r["model"] == model_name and r["mode"] != "dense"):
            rows += _phase_rows(dense, resu_run)
    return rows


def _phase_rows(dense: dict[str, Any], resu_run: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of one resu run; memory target: dense peak + 1% + 2 bits per managed weight."""
    allowance = (
        dense["phases"]["dense"]["peak_MiB"] * 1.01 + 2 * resu_run["managed_weights"] / 8 / 2**20
    )
    rows = []
    for phase, values in resu_run["phases"].items():
        forward_only = phase.startswith("calibrate")
        baseline = dense["phases"]["forward" if forward_only else "dense"]
        same_process = resu_run.get("interleaved", {}).get(phase)
        rows.append(
            {
                "model": resu_run["model"],
                "mode": resu_run["mode"],
                "phase": phase,
                "ms": values["ms"],
                "dense ms": baseline["ms"],
                "time x dense": values["ms"] / baseline["ms"],
                "x dense (same process)": same_process["ratio"] if same_process else None,
                "same-process quartiles": (
                    [same_process["ratio_p25"], same_process["ratio_p75"]]
                    if same_process and "ratio_p25" in same_process
                    else None
                ),
                "peak MiB": values["peak_MiB"],
                "dense MiB": baseline["peak_MiB"],
                "memory within target": None if forward_only else values["peak_MiB"] <= allowance,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.json"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma list from " + ", ".join(MODES)
    )
    parser.add_argument(
        "--merge",
        type=Path,
        help="an earlier result JSON: its runs of (model, mode) pairs not run now are kept beside "
        "the new ones (may be --out itself)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/overhead.py needs a CUDA GPU")
    if args.worker:
        model_name, mode = args.worker.split("/")
        print(json.dumps(worker(model_name, mode, args.steps)))
        return
    command = shlex.join(["python", "benchmarks/overhead.py", *sys.argv[1:]])
    earlier: list[dict[str, Any]] = []
    commands = [command]
    if args.merge is not None:
        earlier, before = load_earlier(args.merge, environment(), args.steps)
        commands = [*before, command]
    runs: list[dict[str, Any]] = []
    for model_name in args.models.split(","):
        for mode in args.modes.split(","):
            run = _run_worker(model_name, mode, args.steps)
            runs.append({**run, "date": environment()["date"]})
            print(f"done: {model_name} {mode} ({run['compile_s']:.1f} s compile)", flush=True)
            # After every worker, so a cut-off run still leaves its numbers (and, merging, the
            # earlier ones of the pairs it did not reach).
            report(merge_runs(earlier, runs), args, command, commands)


def report(
    runs: list[dict[str, Any]], args: argparse.Namespace, command: str, commands: list[str]
) -> None:
    """Write the JSON and print the tables for the runs so far."""
    rows = summarize(runs)
    compile_rows = [
        {
            "model": r["model"],
            "mode": r["mode"],
            "compile s": r["compile_s"],
            "graphs": r["graphs"],
            "graph breaks": r["graph_breaks"],
            "steady-state recompiles": r.get("steady_state_recompiles"),
            **{f"{k} ms/100M": v for k, v in r.get("transitions_ms_per_100M", {}).items()},
            **{
                f"{k} ms/100M (later cycle)": v
                for k, v in r.get("interleaved", {})
                .get("transitions_steady_ms_per_100M", {})
                .items()
            },
        }
        for r in runs
    ]
    result = {
        **environment(),
        "command": command,
        "commands": commands,
        "sparsity": SPARSITY,
        "steps": args.steps,
        "runs": runs,
        "summary": rows,
        "compile": compile_rows,
    }
    write_json(args.out, result)
    print(
        f"{result['device']}  torch {result['torch']}  triton {result['triton']}  {result['date']}"
    )
    print(tabulate(compile_rows, headers="keys", floatfmt=".3g"))
    print()
    print(tabulate(rows, headers="keys", floatfmt=".4g"), flush=True)


if __name__ == "__main__":
    main()
