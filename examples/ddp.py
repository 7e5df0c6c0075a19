"""RESU under DistributedDataParallel: ``DDP(resu.compile(model))``, one process per device.

(``resu.compile(DDP(model))`` works too: it compiles the inner module and returns the DDP.)

    torchrun --nproc_per_node 2 examples/ddp.py [--steps 60]

gloo on CPU, nccl on GPUs (one per process). Every rank compiles its own copy of the model; DDP
averages the gradients, so every rank takes the same optimizer step and, with the same ``seed``,
the same prune, selection and commit decisions: the masks stay identical without being sent.
At the end each rank prints a hash of its masks, and rank 0 checks that all ranks agree.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import resu_compile as resu
from resu_examples.launch import start_process_group

FEATURES, CLASSES, HIDDEN = 32, 8, 128


def mask_hash(masks: dict[str, torch.Tensor | None]) -> str:
    """A short SHA-256 of every managed weight's name and mask, in name order."""
    digest = hashlib.sha256()
    for name in sorted(masks):
        mask = masks[name]
        digest.update(name.encode())
        if mask is not None:
            digest.update(mask.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--sparsity", type=float, default=0.7, help="final sparsity (default 0.7)")
    parser.add_argument("--batch-size", type=int, default=32, help="per-rank batch (default 32)")
    args = parser.parse_args(argv)

    device = start_process_group("ddp.py")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
        model = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, CLASSES),
        ).to(device)
        teacher = torch.nn.Linear(FEATURES, CLASSES).to(device)

        compiler = "inductor" if device.type == "cuda" else "aot_eager"
        compiled = resu.compile(
            model, sparsity=args.sparsity, cycles=2, total_steps=args.steps, compiler=compiler
        )
        ddp = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1 + rank)  # each rank its own data shard

        for step in range(1, args.steps + 1):
            x = torch.randn(args.batch_size, FEATURES, generator=generator).to(device)
            with torch.no_grad():
                y = teacher(x).argmax(dim=1)
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()  # DDP all-reduces the gradients here
            compiled.resu.step(optimizer)
            if rank == 0 and (step % max(1, args.steps // 5) == 0 or step == args.steps):
                phase = compiled.resu.phase.value
                print(f"step {step:>5}  phase {phase:<9}  loss {loss.item():.4f}", flush=True)

        digest = mask_hash(compiled.resu.masks())
        print(f"rank {rank}/{world}: mask hash {digest}", flush=True)
        hashes: list[str | None] = [None] * world
        dist.all_gather_object(hashes, digest)
        if len(set(hashes)) != 1:
            raise SystemExit(f"rank {rank}: masks differ between ranks: {hashes}")
        if rank == 0:
            print(f"masks agree on all {world} ranks", flush=True)
            print(compiled.resu.report(), flush=True)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
