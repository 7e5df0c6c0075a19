"""Exact top-k with the tie rule every method rule shares: larger score first, then lower index."""

from __future__ import annotations

import torch


def topk_mask(scores: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of ``scores``' shape with exactly ``min(k, #eligible)`` True entries.

    The chosen entries are the ``k`` largest scores among ``eligible`` (all, if None); equal scores
    are broken by the lower flat index, so the result never depends on sort stability.
    """
    flat = scores.reshape(-1)
    if eligible is None:
        candidates = torch.arange(flat.numel(), device=flat.device)
    else:
        candidates = eligible.reshape(-1).nonzero().squeeze(1)
    k = max(0, min(int(k), candidates.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k == 0:
        return chosen.reshape(scores.shape)
    # Stable descending sort keeps index order among equal scores.
    order = torch.sort(flat[candidates].float(), descending=True, stable=True).indices
    chosen[candidates[order[:k]]] = True
    return chosen.reshape(scores.shape)
