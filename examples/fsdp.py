"""RESU under FSDP2: ``fully_shard`` the layers and the root, then ``resu.compile(model)``.

    torchrun --nproc_per_node 2 examples/fsdp.py [--steps 60]

gloo on CPU, nccl on GPUs (one per process). Every managed weight is a DTensor sharded by rows;
each rank keeps the mask bits of its own rows, steps its shard, and decides its part of every mask
with a distributed selection in which only counts cross ranks. At the end each rank prints the
active count of its shards, and rank 0 prints the whole-weight sparsities of the last commit.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import resu_compile as resu
from resu_examples.launch import start_process_group

FEATURES, CLASSES, HIDDEN = 32, 8, 128


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--sparsity", type=float, default=0.7, help="final sparsity (default 0.7)")
    parser.add_argument("--batch-size", type=int, default=32, help="per-rank batch (default 32)")
    args = parser.parse_args(argv)

    device = start_process_group("fsdp.py")
    rank = dist.get_rank()
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, CLASSES),
        ).to(device)
        teacher = torch.nn.Linear(FEATURES, CLASSES).to(device)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)

        compiler = "inductor" if device.type == "cuda" else "aot_eager"
        model = resu.compile(
            model, sparsity=args.sparsity, cycles=2, total_steps=args.steps, compiler=compiler
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1 + rank)  # each rank its own data shard

        for step in range(1, args.steps + 1):
            x = torch.randn(args.batch_size, FEATURES, generator=generator).to(device)
            with torch.no_grad():
                y = teacher(x).argmax(dim=1)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()  # FSDP reduce-scatters each gradient into its shard
            model.resu.step(optimizer)
            if rank == 0 and (step % max(1, args.steps // 5) == 0 or step == args.steps):
                phase = model.resu.phase.value
                print(f"step {step:>5}  phase {phase:<9}  loss {loss.item():.4f}", flush=True)

        shards = {w.name: (tuple(w.shape), w.active_count()) for w in model.resu.state}
        print(f"rank {rank}: local shards (shape, active) {shards}", flush=True)
        commits = [e for e in model.resu.history if e["event"] == "commit"]
        if rank == 0 and commits:
            sparsities = {
                n: round(layer["sparsity"], 4) for n, layer in commits[-1]["layers"].items()
            }
            print(f"whole-weight sparsity after the last commit: {sparsities}", flush=True)
            numels = {w.name: w.total_numel for w in model.resu.state}
            pruned = sum(
                numels[n] * layer["sparsity"] for n, layer in commits[-1]["layers"].items()
            )
            print(
                f"model sparsity after the last commit: {pruned / sum(numels.values()):.4f}",
                flush=True,
            )
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
