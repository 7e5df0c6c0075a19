"""The RESU phase's trainable subset S of the pruned set P, and theta's initial values."""

from __future__ import annotations

import torch


def select_trainable(
    pruned: torch.Tensor, mode: str, alpha: float, generator: torch.Generator
) -> torch.Tensor:
    """Bool mask of S within ``pruned`` (METHOD.md section 4).

    - ``all``: ``S = P``.
    - ``random``: exactly ``int(alpha * |P|)`` coordinates of P drawn uniformly, once at entry.
    """
    if mode == "all":
        return pruned.clone()
    if mode == "random":
        candidates = pruned.reshape(-1).nonzero().squeeze(1)
        count = int(alpha * candidates.numel())
        order = torch.randperm(candidates.numel(), generator=generator, device="cpu")
        chosen = torch.zeros(pruned.numel(), dtype=torch.bool, device=pruned.device)
        chosen[candidates[order[:count].to(candidates.device)]] = True
        return chosen.reshape(pruned.shape)
    raise ValueError(f"selection: unknown selective mode {mode!r}")


def initial_theta(
    weight: torch.Tensor,
    active: torch.Tensor,
    trainable: torch.Tensor,
    eps: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Values for the coordinates of S: ``eps * sigma_A * N(0, 1)``, one per True of ``trainable``.

    ``sigma_A`` is the unbiased std of the layer's active weights at entry (0 when fewer than two
    are active, so theta then starts at 0).
    """
    active_values = weight.detach()[active].float()
    sigma = float(active_values.std()) if active_values.numel() > 1 else 0.0
    count = int(trainable.sum())
    noise = torch.randn(count, generator=generator, device="cpu", dtype=torch.float32)
    return (eps * sigma * noise).to(device=weight.device, dtype=weight.dtype)
