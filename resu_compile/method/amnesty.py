"""Commit by amnesty (METHOD.md section 5): actives and resurrection candidates compete apart."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resu_compile.method.topk import topk_mask


@dataclass(frozen=True)
class AmnestyResult:
    """The new mask and the counts that telemetry reports."""

    mask: torch.Tensor
    n_keep: int
    n_reserved: int
    resurrected: int


def amnesty_scores(weight: torch.Tensor, score: str) -> torch.Tensor:
    """Score of every coordinate of ``W_eff`` (stored in place in ``weight``)."""
    if score == "magnitude":
        return weight.detach().abs()
    raise ValueError(f"amnesty_score: unknown score {score!r}")


def amnesty_mask(
    scores: torch.Tensor, old_mask: torch.Tensor, n_keep: int, budget: float
) -> AmnestyResult:
    """The tournament: ``n_R = int(r * n_keep)`` places reserved for previously pruned coordinates.

    Actives compete among themselves for ``n_A = n_keep - n_R`` places, pruned ones for ``n_R``.
    A group too small to fill its places leaves a shortfall, filled first from the rest of P by
    score, then from the rest of A. Ties go to the lower index.
    """
    old_pruned = ~old_mask
    n_reserved = int(budget * n_keep)
    n_active_places = n_keep - n_reserved
    winners = topk_mask(scores, n_active_places, eligible=old_mask)
    winners |= topk_mask(scores, n_reserved, eligible=old_pruned)
    shortfall = n_keep - int(winners.sum())
    if shortfall > 0:
        winners |= topk_mask(scores, shortfall, eligible=old_pruned & ~winners)
        shortfall = n_keep - int(winners.sum())
    if shortfall > 0:
        winners |= topk_mask(scores, shortfall, eligible=old_mask & ~winners)
    resurrected = int((winners & old_pruned).sum())
    return AmnestyResult(
        mask=winners, n_keep=n_keep, n_reserved=n_reserved, resurrected=resurrected
    )
