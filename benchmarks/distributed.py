"""RESU under DDP and FSDP2: per-phase step time against the same engine's dense run, peak memory
per rank, the cost of each transition and the bytes it moves between ranks, and mask agreement
across ranks and with a single-process run of the same seed.

    python -m benchmarks.distributed --world 2 [--models gpt2,llama] [--engines ddp,fsdp2]
    python -m benchmarks.distributed --world 2 --backend gloo --size tiny   # CPU, a smoke run

The parent spawns ``--world`` processes per (model, engine) that meet through a FileStore (no
torchrun needed), plus one single-process run per model on the global batch (every rank's batch
together), which is the reference of the masks. Every rank trains on its own slice of the same
synthetic byte sequences (timing does not need real text), with bf16 autocast and fused AdamW on
CUDA (fp32 and the foreach AdamW on CPU).

Per run: the engine's dense model (``torch.compile`` over ``DDP(model)``, or over the root of the
``fully_shard``-ed model) trains ``--steps`` steps first; then the RESU model
(``resu.compile(..., manual=True)`` in each engine's documented order) trains the same number of
steps in every phase: before the prune, sparse, RESU, after the commit. A transition is timed from
an idle device to its work done, and every collective it calls is counted (the bytes this rank
hands to it: all-reduce, all-gather, broadcast and gather of objects by their pickled size).
After every transition each rank hashes the full masks (FSDP2: every rank's rows gathered, outside
the timing and the count); the parent checks that every rank saw the same masks and compares them
with the single-process run's (bits that agree; floating-point reductions in another order can
move a few coordinates at the threshold).

Results go to ``--out`` (default ``benchmarks/results/distributed.json``) with device, versions and
date; the table is printed and ``benchmarks/render_results.py`` renders it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import os
import pickle
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import resu_compile as resu
from benchmarks.accuracy_tasks import build_gpt, build_llama
from benchmarks.common import environment, timed_ms, write_json
from resu_compile.kernels.bits import pack_bits

ROOT = Path(__file__).resolve().parent.parent
#: Model builders and their arguments: the GPT-2-small-sized decoder and the accuracy study's
#: Llama-style decoder ("full"), and a few-layer version of each for a CPU smoke run ("tiny").
SIZES: dict[str, dict[str, tuple[Callable[..., torch.nn.Module], dict[str, int]]]] = {
    "full": {
        "gpt2": (build_gpt, {"layers": 12, "width": 768, "heads": 12}),
        "llama": (build_llama, {"layers": 6, "hidden": 384, "intermediate": 1024, "heads": 6}),
    },
    "tiny": {
        "gpt2": (build_gpt, {"layers": 2, "width": 64, "heads": 4}),
        "llama": (build_llama, {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4}),
    },
}
CONTEXT = {"full": 256, "tiny": 32}
ENGINES = ("ddp", "fsdp2")
PHASES = ("before prune", "sparse", "resu", "after commit")
TRANSITIONS = ("prune", "enter_resu", "commit")
SPARSITY = 0.7
WARMUP_STEPS = 3


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


#: The collectives a transition may call, and how many bytes a call hands over.
_COLLECTIVES: dict[str, Callable[..., int]] = {
    "all_reduce": lambda tensor, *a, **k: _tensor_bytes(tensor),
    "all_gather": lambda out, tensor, *a, **k: _tensor_bytes(tensor),
    "all_gather_into_tensor": lambda out, tensor, *a, **k: _tensor_bytes(tensor),
    "broadcast": lambda tensor, *a, **k: _tensor_bytes(tensor),
    "all_gather_object": lambda out, obj, *a, **k: len(pickle.dumps(obj)),
    "broadcast_object_list": lambda objs, *a, **k: len(pickle.dumps(objs)),
}


# -- one rank ------------------------------------------------------------------------------------


@contextlib.contextmanager
def counted_collectives() -> Iterator[dict[str, int]]:
    """Count the calls and bytes of every collective in :data:`_COLLECTIVES` made meanwhile
    through ``torch.distributed`` (the library calls them as ``dist.<name>``)."""
    counts: dict[str, int] = {"bytes": 0, "calls": 0}
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            counts["bytes"] += _COLLECTIVES[name](*args, **kwargs)
            counts["calls"] += 1
            counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(dist, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _full_masks(controller: resu.PhaseController, sharded: bool) -> dict[str, torch.Tensor]:
    """Every managed weight's whole mask (under FSDP2 every rank's rows, gathered in rank order)."""
    masks = {w.name: w.mask().cpu() for w in controller.state}
    if not sharded or dist.get_world_size() == 1:
        return masks
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, masks)
    return {name: torch.cat([part[name] for part in parts]) for name in masks}


def _digest(masks: dict[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(masks):
        hasher.update(name.encode())
        hasher.update(pack_bits(masks[name]).numpy().tobytes())
    return hasher.hexdigest()[:16]


def _wrap(model: torch.nn.Module, engine: str, device: torch.device) -> torch.nn.Module:
    """``model`` under ``engine`` ("single": as it is), in the order resu.compile needs after."""
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if module is not model and type(module).__name__ in ("Block", "LlamaDecoderLayer"):
                fully_shard(module)
        fully_shard(model)
    return model


def _batches(args: argparse.Namespace, rank: int, world: int, device: torch.device):
    """Step ``i``'s byte sequences for ``rank`` (``world`` 1: every rank's, concatenated)."""
    context = CONTEXT[args.size]

    def batch(step: int) -> torch.Tensor:
        parts = []
        for part in range(args.world) if world == 1 else (rank,):
            generator = torch.Generator().manual_seed(step * 1000 + part)
            parts.append(torch.randint(0, 256, (args.batch_size, context + 1), generator=generator))
        return torch.cat(parts).to(device)

    return batch


def run_rank(args: argparse.Namespace, model_name: str, engine: str, rank: int, world: int) -> dict:
    """One rank's measurements of ``model_name`` under ``engine`` (see the module docstring)."""
    device = torch.device(f"cuda:{rank}" if args.backend == "nccl" else "cpu")
    cuda = device.type == "cuda"
    build, kwargs = SIZES[args.size][model_name]
    batch = _batches(args, rank, world, device)
    compiler = "inductor" if cuda else "aot_eager"

    def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        tokens = batch(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if hasattr(model, "resu"):
            model.resu.step(optimizer)
        else:
            optimizer.step()

    def phase(model, optimizer, first: int) -> dict[str, Any]:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for step in range(first, first + WARMUP_STEPS):
            train_step(model, optimizer, step)
        times = [
            timed_ms(functools.partial(train_step, model, optimizer, step))
            for step in range(first + WARMUP_STEPS, first + WARMUP_STEPS + args.steps)
        ]
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
        return {"ms": statistics.median(times), "peak_MiB": peak}

    def optimizer_of(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda, foreach=not cuda)

    out: dict[str, Any] = {"rank": rank}
    steps_per_phase = WARMUP_STEPS + args.steps
    if engine != "single":
        torch.manual_seed(0)
        dense = _wrap(build(**kwargs).to(device), engine, device)
        dense = torch.compile(dense, backend=compiler)
        out["dense"] = phase(dense, optimizer_of(dense), 0)
        del dense
        if cuda:
            torch.cuda.empty_cache()

    torch.manual_seed(0)
    model = resu.compile(
        _wrap(build(**kwargs).to(device), engine, device),
        sparsity=SPARSITY,
        manual=True,
        compiler=compiler,
        seed=0,
    )
    optimizer = optimizer_of(model)
    controller = model.resu
    managed = None
    out["phases"], out["transitions"] = {}, []
    transitions = (controller.prune, controller.enter_resu, controller.commit, None)
    for i, (name, transition) in enumerate(zip(PHASES, transitions, strict=True)):
        out["phases"][name] = phase(model, optimizer, i * steps_per_phase)
        if managed is None:
            managed = sum(w.total_numel for w in controller.state)
        if transition is None:
            break
        with counted_collectives() as counts:
            ms = timed_ms(transition)
        masks = _full_masks(controller, engine == "fsdp2")
        record = {"event": TRANSITIONS[i], "ms": ms, "ms_per_100M": ms / (managed / 1e8)}
        record.update({"collectives": counts, "digest": _digest(masks)})
        if rank == 0:
            record["masks"] = masks
        out["transitions"].append(record)
    out["managed_weights"] = managed
    return out


def _entry(rank: int, args: argparse.Namespace, model: str, engine: str, world: int, tmp: str):
    """A spawned rank: its process group over a FileStore, its results to ``rank{r}.pt``."""
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    store = dist.FileStore(os.path.join(tmp, "store"), world)
    device = torch.device("cuda", rank) if args.backend == "nccl" else None
    dist.init_process_group(
        args.backend, store=store, rank=rank, world_size=world, device_id=device
    )
    try:
        result = run_rank(args, model, engine, rank, world)
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(args: argparse.Namespace, model: str, engine: str, world: int) -> list[dict[str, Any]]:
    """Every rank's results of one (model, engine) run on ``world`` processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(args, model, engine, world, tmp), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


# -- the parent ----------------------------------------------------------------------------------


def summarize(ranks: list[dict[str, Any]], single: dict[str, Any]) -> dict[str, Any]:
    """One run's rows from its ranks' results and the single-process reference."""
    phases = {}
    for name in PHASES:
        ms = max(r["phases"][name]["ms"] for r in ranks)  # a step ends when every rank is done
        dense_ms = max(r["dense"]["ms"] for r in ranks)
        peaks = [r["phases"][name]["peak_MiB"] for r in ranks]
        phases[name] = {
            "ms": ms,
            "dense_ms": dense_ms,
            "ratio": ms / dense_ms,
            "peak_MiB": peaks,
            "dense_peak_MiB": [r["dense"]["peak_MiB"] for r in ranks],
            "single_peak_MiB": single["phases"][name]["peak_MiB"],
        }
    transitions = []
    for i, event in enumerate(TRANSITIONS):
        mine = [r["transitions"][i] for r in ranks]
        reference = single["transitions"][i]["masks"]
        agreeing = total = 0
        for name, mask in mine[0]["masks"].items():
            agreeing += int((mask == reference[name]).sum())
            total += mask.numel()
        transitions.append(
            {
                "event": event,
                "ms": max(t["ms"] for t in mine),
                "ms_per_100M": max(t["ms_per_100M"] for t in mine),
                "bytes_per_rank": [t["collectives"]["bytes"] for t in mine],
                "collectives_per_rank": [t["collectives"] for t in mine],
                "ranks_agree": len({t["digest"] for t in mine}) == 1,
                "same_as_single": mine[0]["digest"] == single["transitions"][i]["digest"],
                "bits_agreeing_with_single": agreeing / total,
            }
        )
    return {
        "managed_weights": ranks[0]["managed_weights"],
        "phases": phases,
        "transitions": transitions,
    }


def table(result: dict[str, Any], tablefmt: str = "simple") -> str:
    """Per-phase step time against the same engine's dense step, peak memory per rank, and every
    transition's cost, bytes and mask agreement."""
    rows = []
    for run in result["runs"]:
        head = [run["model"], run["engine"]]
        for name, cell in run["phases"].items():
            peaks = "/".join(f"{p:.0f}" for p in cell["peak_MiB"] if p is not None)
            dense_peaks = "/".join(f"{p:.0f}" for p in cell["dense_peak_MiB"] if p is not None)
            rows.append([*head, name, f"{cell['ms']:.2f}", f"{cell['ratio']:.3f}", peaks,
                         dense_peaks, "", "", ""])  # fmt: skip
        for t in run["transitions"]:
            agree = f"{'yes' if t['ranks_agree'] else 'NO'} / {t['bits_agreeing_with_single']:.6f}"
            rows.append([*head, t["event"], f"{t['ms']:.1f}", "", "", "",
                         f"{t['ms_per_100M']:.1f}", max(t["bytes_per_rank"]), agree])  # fmt: skip
    headers = ["model", "engine", "phase / transition", "ms", "x dense", "peak MiB per rank",
               "dense MiB per rank", "ms per 100M", "bytes per rank", "ranks agree / bits as single"]  # fmt: skip
    return tabulate(rows, headers=headers, tablefmt=tablefmt)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="processes (GPUs) per run")
    parser.add_argument("--backend", choices=("nccl", "gloo"), help="default: nccl with CUDA")
    parser.add_argument(
        "--models", default="gpt2,llama", help=f"comma list of {list(SIZES['full'])}"
    )
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {ENGINES}")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per phase")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/distributed.json")
    args = parser.parse_args(argv)
    args.backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    args.models, args.engines = args.models.split(","), args.engines.split(",")
    for name, values, allowed in (("models", args.models, SIZES["full"]), ("engines", args.engines, ENGINES)):  # fmt: skip
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"--{name}: unknown {unknown}; choose from {list(allowed)}")
    for name in ("world", "steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.backend == "nccl" and torch.cuda.device_count() < args.world:
        parser.error(f"--world {args.world} needs as many GPUs, found {torch.cuda.device_count()}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(
        ["python", "-m", "benchmarks.distributed", *(sys.argv[1:] if argv is None else argv)]
    )
    runs = []
    for model in args.models:
        single = spawn(args, model, "single", 1)[0]
        for engine in args.engines:
            summary = summarize(spawn(args, model, engine, args.world), single)
            runs.append({"model": model, "engine": engine, **summary})
            print(f"{model} {engine}: done", flush=True)
    result = {
        **environment(),
        "command": command,
        "world": args.world,
        "backend": args.backend,
        "size": args.size,
        "sparsity": SPARSITY,
        "steps_per_phase": args.steps,
        "batch_per_rank": args.batch_size,
        "context": CONTEXT[args.size],
        "runs": runs,
    }
    write_json(args.out, result)
    print(table(result))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
