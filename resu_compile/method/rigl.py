"""RigL (Evci et al. 2020) as a baseline on the same compile path: drop by magnitude, grow by gradient."""

from __future__ import annotations

import math

import torch

from resu_compile.method.topk import topk_mask


def rigl_fraction(step: int, end_step: int, alpha: float) -> float:
    """Cosine-decayed update fraction ``alpha / 2 * (1 + cos(pi * step / end_step))``; 0 from
    ``end_step`` on (RigL stops changing the mask at ``end_step``)."""
    if step >= end_step or end_step <= 0:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / end_step))


def rigl_regrow(
    weight: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor,
    count: int,
    active_count: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One RigL mask update: ``count`` smallest ``|W|`` actives leave, ``count`` largest ``|grad|``
    inactive coordinates (those just dropped included, as in RigL) join.

    Returns ``(new_mask, grown)``; ``grown`` marks coordinates that were not active before, whose
    weights and optimizer state the caller zeroes (RigL grows new connections at 0). The active
    count is unchanged. Ties go to the lower index.
    """
    n_active = int(mask.sum()) if active_count is None else active_count
    count = max(0, min(count, n_active, mask.numel() - n_active))
    if count == 0:
        return mask.clone(), torch.zeros_like(mask)
    kept = topk_mask(weight.detach().abs(), n_active - count, eligible=mask)
    # A non-finite gradient (a step skipped for NaN / Inf) must not poison the ranking.
    scores = grad.detach().float().nan_to_num(0.0, 0.0, 0.0).abs()
    grown = topk_mask(scores, count, eligible=~kept)
    return kept | grown, grown & ~mask
