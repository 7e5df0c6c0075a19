"""The consistency selective mode (METHOD.md section 4): per-step selection by gradient agreement.

Over the pruned set P the phase keeps ``m = b*m + (1-b)*g`` and ``v = b*v + (1-b)*|g|``; the
consistency ``C = |m| / (v + delta)`` is in [0, 1) and is near 1 only where the gradient keeps one
sign. Each step updates ``I = TopK(|g|, k_select)`` within ``TopK(|g|, k_screen) ∩ {C > tau}``, and
the update is weighted by ``C``.
"""

from __future__ import annotations

import torch

from resu_compile.method.topk import topk_mask

DELTA = 1e-8


def update_statistics_(
    grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, pruned: torch.Tensor, beta: float
) -> torch.Tensor:
    """Advance ``m`` and ``v`` in place on ``pruned`` only (other slots are left exactly as they
    are: they may hold the user's optimizer state) and return ``C`` (0 outside ``pruned``).

    ``C`` is computed from the statistics as stored (in ``m``'s dtype), as the theta step that
    weights the gradient by it reads them back."""
    g = grad.float()
    new_m = m.float() * beta + g * (1 - beta)
    new_v = v.float() * beta + g.abs() * (1 - beta)
    m.copy_(torch.where(pruned, new_m.to(m.dtype), m))
    v.copy_(torch.where(pruned, new_v.to(v.dtype), v))
    return torch.where(pruned, consistency(m, v), 0.0)


def consistency(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``C = |m| / (v + delta)`` in fp32."""
    return m.float().abs() / (v.float() + DELTA)


def select_consistent(
    grad: torch.Tensor,
    consistency: torch.Tensor,
    pruned: torch.Tensor,
    k_screen: int,
    k_select: int,
    tau: float,
) -> torch.Tensor:
    """Bool mask ``I``: the ``k_select`` largest ``|g|`` among the ``k_screen`` largest ``|g|`` of
    ``pruned`` whose consistency exceeds ``tau`` (fewer when too few pass the screen)."""
    magnitude = grad.detach().abs()
    screened = topk_mask(magnitude, k_screen, eligible=pruned)
    return topk_mask(magnitude, k_select, eligible=screened & (consistency > tau))
