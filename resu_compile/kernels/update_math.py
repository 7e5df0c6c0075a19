"""What the references of the masked SGD / Adam and theta updates share, op for op with torch.

The references issue the very same tensor operations, in the same order, as the single-tensor path
of ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` (``foreach=False``), which makes them bit-identical to
torch on fp32 coordinates. fp16 / bf16 tensors are updated in fp32 and rounded once on the way back,
which is what the Triton kernels do; torch.optim would round after every operation instead.

Each update takes an optional ``found_inf`` (a one-element tensor, as torch's fused optimizers
take): nonzero or NaN skips the step, leaving every tensor untouched. The Triton kernels read it on
the device; the references, the CPU path, check it on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def work(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor to compute on: itself, or an fp32 copy of a 16-bit tensor."""
    return tensor.float() if tensor.dtype in _LOW_PRECISION else tensor


def write_back(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    active: torch.Tensor | None,
    kept: list[torch.Tensor] | None = None,
) -> None:
    """Zero the pruned coordinates of each work tensor (or, with ``kept``, restore them from those
    copies of the destinations taken before the update), then store it into its destination."""
    for i, (dst, value) in enumerate(pairs):
        if active is not None:
            if kept is None:
                value.masked_fill_(~active, 0.0)
            else:
                value.copy_(torch.where(active, value, kept[i].to(value.dtype)))
        if value is not dst:
            dst.copy_(value)


def skip_step(found_inf: torch.Tensor | None) -> bool:
    """Whether ``found_inf`` says to skip the step (nonzero, NaN or True)."""
    return found_inf is not None and bool(found_inf)


def adam_math_(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
) -> None:
    """The body of torch's ``_single_tensor_adam`` (no amsgrad, not capturable), op for op."""
    if weight_decay != 0:
        if decoupled_weight_decay:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


THETA_RULES = ("sgd", "momentum", "adamw")


class ThetaAdamW(NamedTuple):
    """Theta's AdamW step on the selected pruned coordinates (METHOD.md section 4), for
    :func:`masked_adam_` to apply in the same pass as the actives' own step; ``select_bits``
    holds one packed selection per weight, aligned with the weights passed along."""

    select_bits: Sequence[torch.Tensor]
    lr: float
    step: int
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    eps: float = 1e-8


def check_consistency_args(m: object | None, v: object | None) -> bool:
    """Whether a theta step is consistency-weighted: both statistics given, or neither."""
    if (m is None) != (v is None):
        raise ValueError("theta_update_: consistency_m and consistency_v go together")
    return m is not None


def check_theta_args(rule: str, exp_avg: object | None, exp_avg_sq: object | None) -> None:
    """That ``rule`` is known and has the states it needs (tensors, or lists of them): shared by
    the reference and the kernel so both reject the same calls."""
    if rule not in THETA_RULES:
        raise ValueError(f"theta_update_: rule must be one of {THETA_RULES}, got {rule!r}")
    if rule in ("momentum", "adamw") and exp_avg is None:
        raise ValueError(f"theta_update_: rule {rule!r} needs exp_avg")
    if rule == "adamw" and exp_avg_sq is None:
        raise ValueError("theta_update_: rule 'adamw' needs exp_avg_sq")
