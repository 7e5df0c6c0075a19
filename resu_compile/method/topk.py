"""Exact top-k with the tie rule every method rule shares: larger score first, then lower index."""

from __future__ import annotations

import torch


def topk_mask(scores: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of ``scores``' shape with exactly ``min(k, #eligible)`` True entries.

    The chosen entries are the ``k`` largest scores among ``eligible`` (all, if None); equal scores
    are broken by the lower flat index. No sort and no host round trip: ``torch.topk`` finds the
    k-th largest value, every score above it is chosen, and the ties at it are taken in index order
    by a running count (transitions stay cheap on the GPU). Scores must be finite: ineligible
    entries are pushed to ``-inf``, which is how ``k`` larger than the eligible set takes them all.
    """
    flat = scores.reshape(-1).float()
    k = max(0, min(int(k), flat.numel()))
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if eligible is not None:
        eligible = eligible.reshape(-1)
        flat = flat.masked_fill(~eligible, float("-inf"))
    kth = torch.topk(flat, k, sorted=False).values.min()
    above = flat > kth
    ties = flat == kth
    if eligible is not None:
        above &= eligible
        ties &= eligible
    needed = k - above.sum()
    chosen = above | (ties & (ties.cumsum(0, dtype=torch.int64) <= needed))
    return chosen.reshape(scores.shape)
