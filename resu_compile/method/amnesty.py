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
    device). A are the old actives, T the pruned coordinates that trained as theta (in S), U the
    other pruned ones. ``from_active`` places go to A and ``from_trained`` to T; a shortfall goes
    first to the rest of A (``extra_active``), then to the rest of T (``extra_trained``), and only
    then, when the target needs more actives than A and T hold (densifying), to U
    (``untrained``, ranked by ``|G|``)."""

    n_keep: int
    n_reserved: int
    from_active: int
    from_trained: int
    extra_active: int
    extra_trained: int
    untrained: int

    @property
    def resurrected(self) -> int:
        return self.from_trained + self.extra_trained + self.untrained


def amnesty_quotas(
    numel: int, n_active: int, n_trained: int, n_keep: int, budget: float
) -> AmnestyQuotas:
    """``n_R = int(r * n_keep)`` places reserved for trained candidates; actives compete for
    ``n_A = n_keep - n_R`` (METHOD.md section 5)."""
    n_keep = min(n_keep, numel)
    n_reserved = int(budget * n_keep)
    from_active = min(n_keep - n_reserved, n_active)
    from_trained = min(n_reserved, n_trained)
    shortfall = n_keep - from_active - from_trained
    extra_active = min(shortfall, n_active - from_active)
    shortfall -= extra_active
    extra_trained = min(shortfall, n_trained - from_trained)
    return AmnestyQuotas(
        n_keep,
        n_reserved,
        from_active,
        from_trained,
        extra_active,
        extra_trained,
        shortfall - extra_trained,
    )


def amnesty_mask(
    scores: torch.Tensor,
    old_mask: torch.Tensor,
    trained: torch.Tensor,
    n_keep: int,
    budget: float,
    *,
    gradient: torch.Tensor | None = None,
    active_count: int | None = None,
) -> AmnestyResult:
    """The tournament of one layer (:func:`amnesty_quotas`); ties go to the lower index.

    ``trained``: the coordinates that trained as theta (S). Untrained pruned coordinates return
    only when densifying, ranked by ``|gradient|`` of the last RESU step (index order without
    one). The commit runs every layer's tournament at once (``transitions.commit_weights``); this
    one-layer form is the rule as METHOD.md states it, and the oracle the tests hold it to.
    """
    trained = trained & ~old_mask
    n_active = int(old_mask.sum()) if active_count is None else active_count
    quotas = amnesty_quotas(old_mask.numel(), n_active, int(trained.sum()), n_keep, budget)
    winners = topk_mask(scores, quotas.from_active, eligible=old_mask)
    winners |= topk_mask(scores, quotas.from_trained, eligible=trained)
    if quotas.extra_active > 0:
        winners |= topk_mask(scores, quotas.extra_active, eligible=old_mask & ~winners)
    if quotas.extra_trained > 0:
        winners |= topk_mask(scores, quotas.extra_trained, eligible=trained & ~winners)
    if quotas.untrained > 0:
        evidence = untrained_scores(gradient, scores)
        winners |= topk_mask(evidence, quotas.untrained, eligible=~old_mask & ~trained)
    return AmnestyResult(
        mask=winners,
        n_keep=quotas.n_keep,
        n_reserved=quotas.n_reserved,
        resurrected=quotas.resurrected,
    )


def untrained_scores(gradient: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """How untrained pruned coordinates rank when a densifying commit needs them: ``|G|`` of the
    last RESU step (non-finite entries count 0), or all ties (index order) without a gradient."""
    if gradient is None:
        return torch.zeros_like(like, dtype=torch.float32)
    return gradient.detach().float().nan_to_num(0.0, 0.0, 0.0).abs()
