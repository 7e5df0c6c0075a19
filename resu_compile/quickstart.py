"""resu-quickstart: RESU against dense training and one-shot pruning, on real images, in minutes.

A newcomer's first question is "does RESU buy anything over pruning a trained model?". This
script puts it to real data with three runs that share the seed, the initial weights, the optimizer,
the minibatches and the number of optimizer steps, so differences come from the method rather than
the setup (it is one seed: gaps of a few tenths of a percent are noise):

a. dense: plain eager training;
b. pruned without recovery: (a) pruned one-shot by magnitude to the target sparsity, not retrained;
c. RESU: ``resu.compile`` from the same initial weights, trained by ``cm.resu.step(opt)`` through
   the whole schedule, so it ends in ``Phase.DONE`` at the target sparsity.

Run ``resu-quickstart --help`` (or ``python -m resu_compile.quickstart``). The defaults keep the
whole run under three minutes on a 2-core CPU for Fashion-MNIST and well under one for digits.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tabulate import tabulate

import resu_compile as resu
from resu_compile import datasets
from resu_compile.datasets import ImageData
from resu_compile.method.pruning import prune_mask

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
    return parser.parse_args(argv)


def load_data(data_dir: str | None) -> tuple[ImageData, str]:
    """The data set and where it came from, so the printout says what the numbers are about."""
    path = datasets.find_fashion_mnist(data_dir)
    if path is not None:
        return datasets.load_fashion_mnist(path), str(path)
    return datasets.load_digits(), "scikit-learn's bundled digits (no Fashion-MNIST found)"


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


def train(
    model: torch.nn.Module,
    data: ImageData,
    settings: Settings,
    controller: resu.PhaseController | None = None,
) -> None:
    """``settings.steps`` AdamW steps; through ``controller.step`` when given (RESU's schedule)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    model.train()
    batches = minibatches(len(data.train_y), settings.batch_size, settings.steps, settings.seed)
    for idx in batches:
        loss = torch.nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if controller is None:
            optimizer.step()
        else:
            controller.step(optimizer)


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


def layer_rows(masks: dict[str, torch.Tensor | None], sparsity: float) -> list[dict[str, Any]]:
    """Per managed weight: final sparsity, and active count against the exact expected one."""
    rows = []
    for name, mask in masks.items():
        numel = mask.numel() if mask is not None else 0
        active = int(mask.sum()) if mask is not None else numel
        rows.append(
            {
                "layer": name,
                "shape": list(mask.shape) if mask is not None else None,
                "sparsity": 1.0 - active / numel if numel else 0.0,
                "active": active,
                "expected_active": int((1.0 - sparsity) * numel),
            }
        )
    return rows


def cycle_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cycle, from the commit events: target sparsity, budget and weights resurrected."""
    return [
        {
            "cycle": entry["cycle"],
            "step": entry["step"],
            "target": next(iter(entry["layers"].values()))["target"],
            "budget": entry["budget"],
            "resurrected": sum(layer["resurrected"] for layer in entry["layers"].values()),
        }
        for entry in history
        if entry["event"] == "commit"
    ]


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def train_dense(init: torch.nn.Module, data: ImageData, settings: Settings) -> torch.nn.Module:
    """Run (a): a copy of ``init`` trained eagerly, without resu-compile."""
    model = copy.deepcopy(init)
    train(model, data, settings)
    return model


def train_resu(init: torch.nn.Module, data: ImageData, settings: Settings) -> torch.nn.Module:
    """Run (c): a copy of ``init`` compiled by ``resu.compile`` and trained to ``Phase.DONE``."""
    cm = resu.compile(copy.deepcopy(init), config=settings.config())
    train(cm, data, settings, controller=cm.resu)
    if cm.resu.phase is not resu.Phase.DONE:
        raise RuntimeError(f"RESU schedule ended in phase {cm.resu.phase.value!r}, not 'done'")
    return cm


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the data, run the three trainings, and return every number the printout shows."""
    start = time.perf_counter()
    data, source = load_data(args.data)
    settings = Settings.resolve(args, data)
    try:
        settings.config()
    except ValueError as exc:  # a bad option: say so before any training time is spent
        raise SystemExit(f"resu-quickstart: error: {exc}") from None
    print(f"data: {data.name} from {source}: {len(data.train_y)} train, {len(data.test_y)} test")
    print(
        f"model: MLP {'-'.join(map(str, settings.sizes))} from seed {settings.seed}; "
        f"{settings.steps} AdamW steps per run ({settings.cycles} RESU cycles of "
        f"{settings.steps_per_cycle}), batch {settings.batch_size}, lr {settings.lr:g}"
    )
    init = build_mlp(settings.sizes, settings.seed)
    dense, dense_s = timed(lambda: train_dense(init, data, settings))
    pruned, pruned_s = timed(lambda: prune_one_shot(dense, settings.sparsity))
    cm, resu_s = timed(lambda: train_resu(init, data, settings))
    return {
        "dataset": data.name,
        "source": source,
        "settings": {**dataclasses.asdict(settings), "steps": settings.steps},
        "accuracy": {
            "dense": accuracy(dense, data),
            "pruned_no_recovery": accuracy(pruned, data),
            "resu": accuracy(cm, data),
        },
        "seconds": {"dense": dense_s, "pruned_no_recovery": pruned_s, "resu": resu_s},
        "layers": layer_rows(cm.resu.masks(), settings.sparsity),
        "cycles": cycle_rows(cm.resu.history),
        "history": cm.resu.history,
        "report": cm.resu.report(),
        "wall_seconds": time.perf_counter() - start,
    }


def print_results(results: dict[str, Any]) -> None:
    """The tables: per-layer sparsity, per-cycle resurrection, and the accuracy comparison."""
    print("\nRESU model, final per-layer sparsity:")
    print(tabulate(results["layers"], headers="keys", floatfmt=".4f"))
    print("\nRESU cycles (from the commit events):")
    print(tabulate(results["cycles"], headers="keys", floatfmt=".4f"))
    print("\nController report:")
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
    with intra_op_threads(args.threads):
        results = run(args)
    print_results(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
