"""Rank-collective helpers: the counts a sharded selection combines, flags every rank must agree
on, and a check that replicated ranks (DDP) hold the same masks and weights.

How masks agree across ranks:

- Replicated (DDP): by construction, with no communication. Every rank holds the same weights
  (DDP broadcasts them at wrap time) and takes the same optimizer step (DDP averages the
  gradients), and every random draw comes from a generator seeded by (seed, weight name, cycle,
  purpose), so every transition makes the same decision everywhere. :func:`check_agreement`
  verifies it (one all-gather of a hash) when asked; nothing calls it in training.
- Sharded (FSDP2): each rank decides the mask of its own shard, and the per-layer counts are made
  exact by a distributed selection (:mod:`resu_compile.method.sharded_topk`) in which only
  histograms and counts are all-reduced. Random draws are of the full weight's shape from the same
  seeded generator on every rank, each rank keeping its rows, so they equal a single process's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from resu_compile.shards import local
from resu_compile.state import ManagedWeight


class GroupCounts:
    """:class:`~resu_compile.method.sharded_topk.ShardCounts` over a process group whose ranks
    hold the shards in rank order."""

    def __init__(self, group: Any, rank: int, world: int) -> None:
        self.group, self.rank, self.world = group, rank, world

    def total(self, counts: torch.Tensor) -> torch.Tensor:
        summed = counts.clone()
        dist.all_reduce(summed, group=self.group)
        return summed

    def before(self, counts: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(counts) for _ in range(self.world)]
        dist.all_gather(parts, counts.contiguous(), group=self.group)
        return torch.stack(parts[: self.rank]).sum(0) if self.rank else torch.zeros_like(counts)


def groups_of(weights: Sequence[ManagedWeight]) -> dict[int, tuple[GroupCounts, list[int]]]:
    """The sharded weights' indices by process group (usually one: FSDP2's mesh)."""
    found: dict[int, tuple[GroupCounts, list[int]]] = {}
    for i, weight in enumerate(weights):
        shard = weight.shard
        if shard is not None:
            entry = found.setdefault(
                id(shard.group), (GroupCounts(shard.group, shard.rank, shard.world), [])
            )
            entry[1].append(i)
    return found


def sum_over_shards(weights: Sequence[ManagedWeight], values: Sequence[float]) -> list[float]:
    """``values[i]`` summed over the shards of weight ``i`` (as given for an unsharded one): one
    all-reduce per process group."""
    return [row[0] for row in sum_rows_over_shards(weights, [[value] for value in values])]


def sum_rows_over_shards(
    weights: Sequence[ManagedWeight], rows: Sequence[Sequence[float]]
) -> list[list[float]]:
    """:func:`sum_over_shards` for a row of numbers per weight (one all-reduce per group)."""
    out = [list(row) for row in rows]
    for counts, indices in groups_of(weights).values():
        device = weights[indices[0]].param.device
        part = torch.tensor([rows[i] for i in indices], dtype=torch.float64, device=device)
        for i, total in zip(indices, counts.total(part).tolist(), strict=True):
            out[i] = total
    return out


def any_rank(flag: torch.Tensor, weights: Sequence[ManagedWeight]) -> torch.Tensor:
    """``flag`` (a 1-element float tensor) raised on every rank if it is raised on one of the
    ranks sharing sharded weights: a step or transition skipped by one rank is skipped by all."""
    for counts, _ in groups_of(weights).values():
        flag = flag.clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=counts.group)
    return flag


def state_digest(weights: Sequence[ManagedWeight]) -> str:
    """A short SHA-256 of every managed weight's name, mask, selection and local values."""
    digest = hashlib.sha256()
    for weight in sorted(weights, key=lambda w: w.name):
        digest.update(weight.name.encode())
        for bits in (weight.mask_bits, weight.select_bits):
            digest.update(b"-" if bits is None else bits.cpu().numpy().tobytes())
        values = local(weight.param.detach()).float().cpu().contiguous()
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def check_agreement(weights: Sequence[ManagedWeight], group: Any = None) -> list[str]:
    """Every rank's :func:`state_digest` (one all-gather); raises ``RuntimeError`` if replicated
    ranks disagree. Collective: every rank of ``group`` must call it."""
    mine = state_digest(weights)
    world = dist.get_world_size(group)
    digests: list[str | None] = [None] * world
    dist.all_gather_object(digests, mine, group=group)
    if len(set(digests)) != 1:
        raise RuntimeError(f"resu: masks or weights differ between ranks: {digests}")
    return digests  # type: ignore[return-value]
