"""Gradient clipping that measures the gradient the step applies."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def clip_applied_grad_norm_(
    parameters: Iterable[torch.Tensor],
    mask_of: Callable[[torch.Tensor], torch.Tensor | None],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with each gradient read as 0 where ``mask_of(param)``
    is False: with the mask applied in the optimizer step, ``.grad`` still holds the pruned
    coordinates, which the step will not apply and the norm must not count. ``.grad`` itself
    keeps its values, scaled like the rest."""
    params = [p for p in parameters if p.grad is not None]
    grads = []
    for param in params:
        mask = mask_of(param)
        grads.append(param.grad if mask is None else param.grad.masked_fill(~mask, 0))
    total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
