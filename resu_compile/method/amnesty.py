"""Commit by amnesty (METHOD.md section 5): actives and resurrection candidates compete apart."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resu_compile.method.pruning import prune_scores
from resu_compile.method.topk import topk_mask


@dataclass(frozen=True)
class AmnestyResult:
    """The new mask and the counts that telemetry reports."""

    mask: torch.Tensor
    n_keep: int
    n_reserved: int
    resurrected: int


def amnesty_scores(
    weight: torch.Tensor,
    score: str,
    *,
    gradient: torch.Tensor | None = None,
    input_norms: torch.Tensor | None = None,
    input_dim: int = 1,
) -> torch.Tensor:
    """Score of every coordinate of ``W_eff`` (stored in place in ``weight``).

    ``magnitude``: ``|W_eff|``; ``gradient``: ``|W_eff| * |G|``; ``wanda``: ``|W_eff| * ||X_j||``
    (the input-column norms broadcast along ``input_dim``). The tournament compares scores within
    each group of the whole layer.
    """
    magnitude = weight.detach().abs().float()
    if score == "magnitude":
        return magnitude
    if score == "gradient":
        if gradient is None:
            raise ValueError("amnesty_score 'gradient' needs the gradient G of the weight")
        return magnitude * gradient.detach().float().nan_to_num(0.0, 0.0, 0.0).abs()
    if score == "wanda":
        scores = prune_scores(weight, "wanda", input_norms=input_norms, input_dim=input_dim)
        return scores.float()
    raise ValueError(f"amnesty_score: unknown score {score!r}")


@dataclass(frozen=True)
class AmnestyQuotas:
    """How many places each group takes (host integers, so the tournament never waits on the
    device): ``from_active`` of A, ``from_pruned`` of P, then the shortfall ``extra_pruned`` from
    the rest of P and ``extra_active`` from the rest of A."""

    n_keep: int
    n_reserved: int
    from_active: int
    from_pruned: int
    extra_pruned: int
    extra_active: int

    @property
    def resurrected(self) -> int:
        return self.from_pruned + self.extra_pruned


def amnesty_quotas(numel: int, n_active: int, n_keep: int, budget: float) -> AmnestyQuotas:
    """``n_R = int(r * n_keep)`` places reserved for previously pruned coordinates; actives compete
    for ``n_A = n_keep - n_R``. A group too small to fill its places leaves a shortfall, filled
    first from the rest of P, then from the rest of A."""
    n_pruned = numel - n_active
    n_keep = min(n_keep, numel)
    n_reserved = int(budget * n_keep)
    from_active = min(n_keep - n_reserved, n_active)
    from_pruned = min(n_reserved, n_pruned)
    shortfall = n_keep - from_active - from_pruned
    extra_pruned = min(shortfall, n_pruned - from_pruned)
    return AmnestyQuotas(
        n_keep, n_reserved, from_active, from_pruned, extra_pruned, shortfall - extra_pruned
    )


def amnesty_mask(
    scores: torch.Tensor,
    old_mask: torch.Tensor,
    n_keep: int,
    budget: float,
    active_count: int | None = None,
) -> AmnestyResult:
    """The tournament of one layer (:func:`amnesty_quotas`); ties go to the lower index.

    The commit runs every layer's tournament at once (``transitions.commit_weights``); this
    one-layer form is the rule as METHOD.md states it, and the oracle the tests hold it to.

    ``active_count`` is ``|A|`` (counted if not given).
    """
    old_pruned = ~old_mask
    n_active = int(old_mask.sum()) if active_count is None else active_count
    quotas = amnesty_quotas(old_mask.numel(), n_active, n_keep, budget)
    winners = topk_mask(scores, quotas.from_active, eligible=old_mask)
    winners |= topk_mask(scores, quotas.from_pruned, eligible=old_pruned)
    if quotas.extra_pruned > 0:
        winners |= topk_mask(scores, quotas.extra_pruned, eligible=old_pruned & ~winners)
    if quotas.extra_active > 0:
        winners |= topk_mask(scores, quotas.extra_active, eligible=old_mask & ~winners)
    return AmnestyResult(
        mask=winners,
        n_keep=quotas.n_keep,
        n_reserved=quotas.n_reserved,
        resurrected=quotas.resurrected,
    )
