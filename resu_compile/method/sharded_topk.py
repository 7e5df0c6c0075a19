"""Exact top-k over a weight split into shards, where only counts ever cross between shards.

The rule is :func:`resu_compile.method.topk.topk_mask`'s (larger score first, ties by lower flat
index of the full weight), for a weight whose shards are consecutive ranges of its flat indices
(shard ``r`` before shard ``r + 1``), each held by one participant. Every participant runs the same
steps on its own scores and combines only counts through a :class:`ShardCounts`:

1. Radix select of the k-th largest key, 8 bits at a time: the scores become order-preserving
   32-bit keys; in each of 4 rounds every shard counts its eligible keys that match the prefix
   found so far in a 256-bin histogram, the histograms are summed over the shards, and every
   participant picks the same next byte from the sum.
2. Ties at the k-th key: each shard counts its keys above it and at it; the number of ties in the
   shards before it tells each shard how many of its own ties (in index order) are still needed.

Per call that is 5 collectives of ``[segments, 256]`` / ``[segments, 2]`` integers for any number of
weights (segments), whatever their size; no score leaves its shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

ROUNDS = (24, 16, 8, 0)  # bit offsets of the key's bytes, most significant first


class ShardCounts(Protocol):
    """How per-shard integer counts combine across the shards of a selection."""

    def total(self, counts: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over every shard (the same result for every participant)."""
        ...

    def before(self, counts: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over the shards before this participant's."""
        ...


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys in ``[0, 2**32)`` that order as the fp32 scores do (``-0.0`` equals ``0.0``)."""
    bits = (scores.reshape(-1).float() + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, ~bits, bits | 0x80000000)


def sharded_topk_masks(
    scores: Sequence[torch.Tensor],
    ks: Sequence[int],
    eligible: Sequence[torch.Tensor | None],
    counts: ShardCounts,
) -> tuple[list[torch.Tensor], list[int]]:
    """Each shard's part of ``topk_mask(full_scores[i], ks[i], full_eligible[i])``, and the number
    chosen in each full weight (``min(k, #eligible)``).

    ``scores[i]`` is this participant's shard of weight ``i`` (finite), ``eligible[i]`` a bool
    tensor of its shape or None (all eligible). Every participant must call with the same ``ks``
    and the same number of segments.
    """
    n = len(scores)
    device = scores[0].device if n else torch.device("cpu")
    keys = [order_keys(s) for s in scores]
    allowed = [
        torch.ones_like(k, dtype=torch.bool) if e is None else e.reshape(-1).bool()
        for k, e in zip(keys, eligible, strict=True)
    ]
    prefix = [0] * n
    need = [max(0, int(k)) for k in ks]
    eligible_totals = [0] * n
    for round_index, shift in enumerate(ROUNDS):
        hist = torch.zeros(n, 256, dtype=torch.int64, device=device)
        for i in range(n):
            keep = allowed[i]
            if round_index:
                keep = keep & ((keys[i] >> (shift + 8)) == (prefix[i] >> (shift + 8)))
            hist[i] = torch.bincount((keys[i][keep] >> shift) & 255, minlength=256)
        summed = counts.total(hist).tolist()
        for i in range(n):
            if round_index == 0:
                eligible_totals[i] = sum(summed[i])
            if need[i] == 0 or need[i] > sum(summed[i]):
                continue  # nothing to choose, or every eligible key: no threshold needed
            above = 0
            for byte in range(255, -1, -1):
                if above + summed[i][byte] >= need[i]:
                    prefix[i] |= byte << shift
                    need[i] -= above
                    break
                above += summed[i][byte]
    wanted = [min(max(0, int(k)), total) for k, total in zip(ks, eligible_totals, strict=True)]
    # Segments that need a threshold: some but not all of their eligible coordinates are chosen.
    split = [0 < wanted[i] < eligible_totals[i] for i in range(n)]
    local = torch.zeros(n, 2, dtype=torch.int64, device=device)
    for i in range(n):
        if split[i]:
            local[i, 0] = (allowed[i] & (keys[i] > prefix[i])).sum()
            local[i, 1] = (allowed[i] & (keys[i] == prefix[i])).sum()
    totals = counts.total(local).tolist()
    before = counts.before(local[:, 1].contiguous()).tolist()
    masks = []
    for i in range(n):
        if wanted[i] == 0:
            masks.append(torch.zeros_like(allowed[i]))
        elif not split[i]:
            masks.append(allowed[i].clone())
        else:
            above = allowed[i] & (keys[i] > prefix[i])
            ties = allowed[i] & (keys[i] == prefix[i])
            room = wanted[i] - totals[i][0] - before[i]  # ties still to take, in index order
            masks.append(above | (ties & (ties.cumsum(0) <= room)))
    return [m.reshape(s.shape) for m, s in zip(masks, scores, strict=True)], wanted
