"""Pruning (METHOD.md section 3): which coordinates stay active at a cycle's target sparsity."""

from __future__ import annotations

import torch

from resu_compile.method.schedule import keep_count
from resu_compile.method.topk import topk_mask


def prune_scores(weight: torch.Tensor, criterion: str) -> torch.Tensor:
    """Score of every coordinate; higher survives."""
    if criterion == "magnitude":
        return weight.detach().abs()
    raise ValueError(f"criterion: unknown pruning criterion {criterion!r}")


def prune_mask(
    weight: torch.Tensor, mask: torch.Tensor | None, sparsity: float, criterion: str = "magnitude"
) -> torch.Tensor:
    """New mask keeping the best ``int((1 - s) * N)`` coordinates of the current active set.

    Pruning never revives: coordinates already pruned stay pruned (growth happens only at commit),
    so when ``sparsity`` is below the current one the mask comes back unchanged.
    """
    n_keep = keep_count(weight.numel(), sparsity)
    return topk_mask(prune_scores(weight, criterion), n_keep, eligible=mask)
