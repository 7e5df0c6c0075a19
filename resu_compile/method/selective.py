"""The RESU phase's trainable subset S of the pruned set P, and theta's initial values."""

from __future__ import annotations

import torch

from resu_compile.method.topk import topk_mask


def select_trainable(
    pruned: torch.Tensor,
    mode: str,
    alpha: float,
    generator: torch.Generator,
    pruned_count: int | None = None,
    gradient: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Bool mask of S within ``pruned`` (METHOD.md section 4), and ``|S|``.

    RESU entry draws S for every weight at once (``transitions.enter_resu_weights``, the same
    rule); ``topk`` re-selection during the phase calls this per weight.

    - ``all`` and ``consistency``: ``S = P`` (consistency picks its per-step subset of S itself).
    - ``topk``: the ``int(alpha * |P|)`` coordinates of P with the largest ``|gradient|``.
    - ``random``: exactly ``int(alpha * |P|)`` coordinates of P, uniformly at random, drawn once
      at entry (the top-k of uniform noise over P: no permutation, no host round trip when the
      caller knows ``pruned_count``).
    """
    if pruned_count is None:
        pruned_count = int(pruned.sum())
    if mode in ("all", "consistency"):
        return pruned.clone(), pruned_count
    if mode == "topk":
        if gradient is None:
            raise ValueError("selection 'topk' needs the gradient G of the weight")
        count = int(alpha * pruned_count)
        # A non-finite gradient (a step about to be skipped) must not poison the ranking.
        scores = gradient.detach().float().nan_to_num(0.0, 0.0, 0.0).abs()
        return topk_mask(scores, count, eligible=pruned), count
    if mode == "random":
        count = int(alpha * pruned_count)
        noise = torch.rand(pruned.shape, generator=generator, device=pruned.device)
        return topk_mask(noise, count, eligible=pruned), count
    raise ValueError(f"selection: unknown selective mode {mode!r}")


def initial_theta(
    weight: torch.Tensor, active: torch.Tensor, eps: float, generator: torch.Generator
) -> torch.Tensor:
    """A tensor of ``weight``'s shape drawn as ``eps * sigma_A * N(0, 1)``; callers keep it on S.

    ``sigma_A`` is the unbiased std of the layer's active weights at entry (0 when fewer than two
    are active, so theta then starts at 0). Computed with masked sums, not boolean indexing, so
    nothing waits on the device.
    """
    values = weight.detach().float()
    count = active.sum()
    mean = torch.where(active, values, 0.0).sum() / count.clamp(min=1)
    variance = torch.where(active, (values - mean).square(), 0.0).sum() / (count - 1).clamp(min=1)
    sigma = torch.where(count > 1, variance.sqrt(), 0.0)
    noise = torch.randn(weight.shape, generator=generator, device=weight.device)
    return (eps * sigma * noise).to(weight.dtype)
