"""resu-quickstart: RESU against dense training and one-shot pruning, on real images, in minutes.

A newcomer's first question is "does RESU buy anything over pruning a trained model?". This
script puts it to real data with three runs that share the seed, the initial weights, the optimizer,
the minibatches and the number of optimizer steps, so differences come from the method rather than
the setup (it is one seed: gaps of a few tenths of a percent are noise):

a. dense: plain eager training;
b. pruned without recovery: (a) pruned one-shot by magnitude to the target sparsity, not retrained;
c. RESU: ``resu.compile`` from the same initial weights, trained by ``cm.resu.step(opt)`` through
   the whole schedule, so it ends in ``Phase.DONE`` at the target sparsity.

Run ``resu-quickstart --help`` (or ``python -m resu_examples.quickstart``). The defaults keep the
whole run under three minutes on a 2-core CPU for Fashion-MNIST and well under one for digits.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tabulate import tabulate

import resu_compile as resu
from resu_compile.method.pruning import prune_mask
from resu_compile.views import telemetry
from resu_compile.views.telemetry import TOTAL
from resu_examples import datasets, plot_history
from resu_examples.datasets import ImageData

T = TypeVar("T")


@dataclass(frozen=True)
class Budget:
    """Per-dataset defaults: the MLP's hidden widths and the training budget.

    Chosen so the three runs fit the time promised in the module docstring on a 2-core CPU
    (measured, start-up included: about 90 s for Fashion-MNIST, 6000 steps of batch 128, i.e. 13
    epochs; about 9 s for digits, 500 steps of batch 64, i.e. 22 epochs).
    """

    hidden: tuple[int, ...]
    steps_per_cycle: int
    batch_size: int
    lr: float = 1e-3


BUDGETS = {
    "fashion-mnist": Budget(hidden=(300, 100), steps_per_cycle=1200, batch_size=128),
    "digits": Budget(hidden=(128, 64), steps_per_cycle=100, batch_size=64),
}


@dataclass(frozen=True)
class Settings:
    """Every option of one run, resolved: the command line, else the dataset's :data:`BUDGETS`."""

    sparsity: float
    cycles: int
    steps_per_cycle: int
    batch_size: int
    lr: float
    seed: int
    compiler: str
    sizes: tuple[int, ...]

    @property
    def steps(self) -> int:
        """Optimizer steps of every run: the RESU schedule's full length."""
        return self.cycles * self.steps_per_cycle

    @classmethod
    def resolve(cls, args: argparse.Namespace, data: ImageData) -> Settings:
        budget = BUDGETS[data.name]
        return cls(
            sparsity=args.sparsity,
            cycles=args.cycles,
            steps_per_cycle=args.steps_per_cycle or budget.steps_per_cycle,
            batch_size=args.batch_size or budget.batch_size,
            lr=args.lr or budget.lr,
            seed=args.seed,
            compiler=args.compiler,
            sizes=(data.train_x.shape[1], *budget.hidden, data.num_classes),
        )

    def config(self) -> resu.ResuConfig:
        """The RESU options; building it validates them before any training time is spent."""
        return resu.ResuConfig(
            sparsity=self.sparsity,
            cycles=self.cycles,
            steps_per_cycle=self.steps_per_cycle,
            compiler=self.compiler,
            seed=self.seed,
        )


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """argparse type: a positive ``kind``, so a bad budget fails before any training."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; budget options left unset take the dataset's :data:`BUDGETS`."""
    parser = argparse.ArgumentParser(
        prog="resu-quickstart",
        description="Compare dense training, one-shot magnitude pruning and RESU on real images.",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="folder holding Fashion-MNIST (default: $RESU_DATA, then the system folder, "
        "then scikit-learn's digits)",
    )
    parser.add_argument("--sparsity", type=float, default=0.7, help="final sparsity (default 0.7)")
    parser.add_argument("--cycles", type=_positive(int), default=5, help="RESU cycles (default 5)")
    parser.add_argument(
        "--steps-per-cycle",
        type=_positive(int),
        metavar="L",
        help="optimizer steps per cycle; every run trains cycles * L steps "
        f"(default: {', '.join(f'{k} {b.steps_per_cycle}' for k, b in BUDGETS.items())})",
    )
    parser.add_argument(
        "--batch-size", type=_positive(int), help="minibatch size (default: per dataset)"
    )
    parser.add_argument("--lr", type=_positive(float), help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and batches (default 0)")
    parser.add_argument(
        "--compiler",
        default="aot_eager",
        choices=["aot_eager", "inductor", "eager"],
        help="inner compiler of the RESU graphs (default aot_eager; inductor compiles slowly on CPU)",
    )
    parser.add_argument(
        "--threads",
        type=_positive(int),
        default=1,
        help="intra-op CPU threads (default 1: for MLPs this small, splitting each op over "
        "threads costs more in synchronisation than it saves)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw the per-cycle figure (sparsity, resurrections, training loss) into this "
        "PNG (needs matplotlib: the 'plot' extra)",
    )
    return parser.parse_args(argv)


def build_mlp(sizes: Sequence[int], seed: int) -> torch.nn.Sequential:
    """A ReLU MLP initialised from ``seed`` alone, without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            if i:
                layers.append(torch.nn.ReLU())
            layers.append(torch.nn.Linear(fan_in, fan_out))
        return torch.nn.Sequential(*layers)


def minibatches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` index batches, epoch by epoch without replacement, from a seeded generator.

    Every run calls this with the same arguments and so sees exactly the same batches.
    """
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(1, n // batch_size)
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=generator)
        for b in range(min(per_epoch, steps - done)):
            yield order[b * batch_size : (b + 1) * batch_size]
        done += min(per_epoch, steps - done)


@dataclass
class StepLog:
    """Per-step record of one run: its phase and the seconds of each half of the step."""

    phases: list[str] = dataclasses.field(default_factory=list)
    forward_backward: list[float] = dataclasses.field(default_factory=list)
    optimizer: list[float] = dataclasses.field(default_factory=list)
    curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)


class Progress:
    """What a run reports while it trains: a line per event, and a tqdm bar on a terminal.

    The bar needs tqdm (not a dependency) and a terminal on stderr; the lines always appear,
    flushed at once, so a log file or a pipe shows the run as it goes.
    """

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.start = time.perf_counter()
        self.bar = _tqdm_bar(label, total)
        self._loss = 0.0
        self._correct = 0
        self._seen = 0

    def record(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch to the running loss and accuracy of the next line."""
        self._loss += loss.item() * len(labels)
        self._correct += int((logits.argmax(dim=1) == labels).sum())
        self._seen += len(labels)
        if self.bar is not None:
            self.bar.update(1)

    def line(self, step: int, total: int, what: str) -> None:
        """Print ``what`` with the step, the running loss and batch accuracy, then reset them."""
        seen = max(1, self._seen)
        text = (
            f"{self.label:>5} step {step:>{len(str(total))}}/{total}  {what}  "
            f"loss {self._loss / seen:.4f}  batch accuracy {self._correct / seen:.4f}  "
            f"({time.perf_counter() - self.start:.1f} s)"
        )
        self._loss, self._correct, self._seen = 0.0, 0, 0
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tqdm_bar(label: str, total: int) -> Any:
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=label, unit="step", leave=False)


def _sparsity(controller: resu.PhaseController) -> float:
    """Pruned fraction of all managed weights."""
    masks = [m for m in controller.masks().values() if m is not None]
    total = sum(m.numel() for m in masks)
    return 1.0 - sum(int(m.sum()) for m in masks) / total if total else 0.0


def _event_text(controller: resu.PhaseController, before: str, events: list[dict[str, Any]]) -> str:
    """``cycle c: old -> new (events), sparsity s``: what one step's transitions did."""
    names = ", ".join(entry["event"] for entry in events)
    cycle = events[0].get("cycle", "?") if events else "?"
    return (
        f"cycle {cycle}: {before} -> {controller.phase.value} ({names}), "
        f"sparsity {_sparsity(controller):.4f}"
    )


def train(
    model: torch.nn.Module,
    data: ImageData,
    settings: Settings,
    label: str,
    controller: resu.PhaseController | None = None,
) -> StepLog:
    """``settings.steps`` AdamW steps; through ``controller.step`` when given (RESU's schedule).

    Reports progress as it goes: with a controller a line per phase change, else a line per
    ``steps_per_cycle`` steps. Returns the per-step timings and the loss curve.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    model.train()
    log = StepLog()
    progress = Progress(label, settings.steps)
    curve_every = max(1, settings.steps // 100)
    batches = minibatches(len(data.train_y), settings.batch_size, settings.steps, settings.seed)
    first = "the first step captures and compiles the model" if controller else "eager"
    print(f"{label:>5} training {settings.steps} steps ({first})", flush=True)
    try:
        for step, idx in enumerate(batches, start=1):
            phase = controller.phase.value if controller is not None else "dense"
            seen_events = len(controller.history) if controller is not None else 0
            start = time.perf_counter()
            logits = model(data.train_x[idx])
            loss = torch.nn.functional.cross_entropy(logits, data.train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            middle = time.perf_counter()
            if controller is None:
                optimizer.step()
            else:
                controller.step(optimizer)
            end = time.perf_counter()
            log.phases.append(phase)
            log.forward_backward.append(middle - start)
            log.optimizer.append(end - middle)
            progress.record(loss.detach(), logits.detach(), data.train_y[idx])
            if step % curve_every == 0:
                log.curve.append((step, loss.item()))
            if controller is not None and controller.phase.value != phase:
                new_events = controller.history[seen_events:]
                progress.line(step, settings.steps, _event_text(controller, phase, new_events))
            elif controller is None and step % settings.steps_per_cycle == 0:
                progress.line(step, settings.steps, "dense")
    finally:
        progress.close()
    return log


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: ImageData) -> float:
    """Held-out test accuracy, in eval mode and without autograd."""
    model.eval()
    predictions = model(data.test_x).argmax(dim=1)
    return (predictions == data.test_y).float().mean().item()


@torch.no_grad()
def prune_one_shot(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """A copy of ``model`` whose Linear weights keep their top ``int((1 - s) * N)`` magnitudes."""
    pruned = copy.deepcopy(model)
    for module in pruned.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.mul_(prune_mask(module.weight, None, sparsity))
    return pruned


def layer_rows(controller: resu.PhaseController) -> list[dict[str, Any]]:
    """Per managed weight: final sparsity, and the active count its mask holds against the share
    its last prune gave it (the layer distribution decides the shares; their sum is exact)."""
    rows = []
    for weight in controller.state:
        mask = weight.mask()
        active = int(mask.sum()) if mask is not None else weight.numel
        rows.append(
            {
                "layer": weight.name,
                "shape": list(weight.shape),
                "sparsity": 1.0 - active / weight.numel,
                "active": active,
                "expected_active": weight.keep_target,
            }
        )
    return rows


def phase_rows(dense: StepLog, resu_log: StepLog) -> list[dict[str, Any]]:
    """Seconds per RESU phase for both runs, over the same steps (the same batches).

    The first step of the RESU run (Dynamo's capture and the first compile) is a row of its own;
    the medians per step leave out the one-off costs inside a phase (compiling a phase's graph
    variant on first use, the prune / RESU entry / commit transitions).
    """
    groups: dict[str, list[int]] = {"first step (capture, compile)": [0]}
    for i, phase in enumerate(resu_log.phases[1:], start=1):
        groups.setdefault(phase, []).append(i)
    groups["all"] = list(range(len(resu_log.phases)))
    rows = []
    for name, steps in groups.items():
        row: dict[str, Any] = {"phase": name, "steps": len(steps)}
        for run, log in (("dense", dense), ("resu", resu_log)):
            row[f"{run}_seconds"] = sum(log.forward_backward[i] + log.optimizer[i] for i in steps)
            for part in ("forward_backward", "optimizer"):
                row[f"{run}_{part}_ms"] = 1e3 * statistics.median(
                    getattr(log, part)[i] for i in steps
                )
        row["ratio"] = row["resu_seconds"] / row["dense_seconds"]
        rows.append(row)
    return rows


def totals_by_cycle(controller: resu.PhaseController) -> list[dict[str, Any]]:
    """The model totals of every commit (:func:`resu_compile.views.telemetry.cycle_rows`)."""
    sizes = {name: m.numel() for name, m in controller.masks().items() if m is not None}
    return [r for r in telemetry.cycle_rows(controller.history, sizes) if r["layer"] == TOTAL]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the data, run the three trainings, and return every number the printout shows."""
    start = time.perf_counter()
    data = datasets.load_image_data(args.data)
    settings = Settings.resolve(args, data)
    try:
        settings.config()
    except ValueError as exc:  # a bad option: say so before any training time is spent
        raise SystemExit(f"resu-quickstart: error: {exc}") from None
    print(
        f"data: {data.name} from {data.source}: {len(data.train_y)} train, {len(data.test_y)} test"
    )
    print(
        f"model: MLP {'-'.join(map(str, settings.sizes))} from seed {settings.seed}; "
        f"{settings.steps} AdamW steps per run ({settings.cycles} RESU cycles of "
        f"{settings.steps_per_cycle}), batch {settings.batch_size}, lr {settings.lr:g}",
        flush=True,
    )
    init = build_mlp(settings.sizes, settings.seed)
    dense = copy.deepcopy(init)
    dense_log = train(dense, data, settings, "dense")
    pruned, pruned_s = timed(lambda: prune_one_shot(dense, settings.sparsity))
    cm = resu.compile(copy.deepcopy(init), config=settings.config())
    resu_log = train(cm, data, settings, "RESU", controller=cm.resu)
    if cm.resu.phase is not resu.Phase.DONE:
        raise RuntimeError(f"RESU schedule ended in phase {cm.resu.phase.value!r}, not 'done'")
    phases = phase_rows(dense_log, resu_log)
    return {
        "dataset": data.name,
        "source": data.source,
        "settings": {**dataclasses.asdict(settings), "steps": settings.steps},
        "accuracy": {
            "dense": accuracy(dense, data),
            "pruned_no_recovery": accuracy(pruned, data),
            "resu": accuracy(cm, data),
        },
        "seconds": {
            "dense": phases[-1]["dense_seconds"],
            "pruned_no_recovery": pruned_s,
            "resu": phases[-1]["resu_seconds"],
        },
        "phases": phases,
        "curves": {"dense": dense_log.curve, "resu": resu_log.curve},
        "layers": layer_rows(cm.resu),
        "cycles": totals_by_cycle(cm.resu),
        "history": cm.resu.history,
        "report": cm.resu.report(),
        "wall_seconds": time.perf_counter() - start,
    }


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


# Why the RESU run costs more than the dense one on a CPU, printed under the measurement.
CPU_COST = (
    "Why RESU costs more here: on a CPU the managed optimizer step runs the pure-PyTorch reference "
    "(resu_compile/kernels/masked_adam.py and its siblings), which per weight unpacks the mask "
    "from its bits, steps AdamW op by op, then re-applies the mask and, in the RESU phase, "
    "gathers and scatters the selected theta by boolean indexing: several passes over every "
    "tensor where torch's AdamW makes one; the compiled graphs also add Dynamo's per-call "
    "overhead to the forward and backward. On a GPU each of these updates is one fused Triton launch, and the sparse and RESU "
    "phases run within a few percent of dense (README, Status)."
)


def print_results(results: dict[str, Any]) -> None:
    """The RESU model's report, the accuracy comparison and the cost of RESU per phase."""
    print("\nRESU model:")
    print(results["report"])
    sparsity = results["settings"]["sparsity"]
    accuracy, seconds = results["accuracy"], results["seconds"]
    rows = [
        [label, s, accuracy[key], seconds[key]]
        for label, key, s in (
            ("dense", "dense", 0.0),
            ("pruned, no recovery", "pruned_no_recovery", sparsity),
            ("RESU", "resu", sparsity),
        )
    ]
    print(
        f"\nTest accuracy on {results['dataset']} "
        f"({results['settings']['steps']} optimizer steps per trained run):"
    )
    print(tabulate(rows, headers=["model", "sparsity", "test accuracy", "seconds"], floatfmt=".4f"))
    print("\n- seconds: training time (forward, backward, optimizer step), or pruning time")
    print("\nTraining time per RESU phase, on the same steps and batches:")
    table = [
        [
            row["phase"],
            row["steps"],
            f"{row['dense_seconds']:.2f}",
            f"{row['resu_seconds']:.2f}",
            f"{row['ratio']:.2f}",
            f"{row['dense_forward_backward_ms']:.2f} / {row['resu_forward_backward_ms']:.2f}",
            f"{row['dense_optimizer_ms']:.2f} / {row['resu_optimizer_ms']:.2f}",
        ]
        for row in results["phases"]
    ]
    headers = ["phase", "steps", "dense s", "RESU s", "RESU / dense", "fwd+bwd ms", "step ms"]
    print(
        tabulate(table, headers=headers, disable_numparse=True, colalign=["left"] + ["right"] * 6)
    )
    print(
        "\n- phase: the RESU run's phase at those steps (the dense run takes the same steps)\n"
        "- fwd+bwd ms, step ms: median milliseconds per step of forward and backward, and of the\n"
        "  optimizer step, dense / RESU (medians leave out one-off compiles and transitions)"
    )
    print("\n" + textwrap.fill(CPU_COST, width=100))
    print(f"\nwall time (data, three runs, evaluation): {results['wall_seconds']:.1f} s")


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``resu-quickstart``); returns the process exit code."""
    args = parse_args(argv)
    if args.plot:
        plot_history.require_matplotlib()  # before minutes of training, not after
    with intra_op_threads(args.threads):
        results = run(args)
    print_results(results)
    if args.plot:
        title = f"RESU on {results['dataset']}, sparsity {results['settings']['sparsity']:g}"
        plot_history.plot_history(
            results["history"], Path(args.plot), title=title, curves=results["curves"]
        )
        print(f"figure written to {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
