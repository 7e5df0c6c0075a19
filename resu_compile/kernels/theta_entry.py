"""RESU entry over every managed weight at once: theta's scale, then theta written on S.

At RESU entry (METHOD.md section 4) each weight gets ``theta = eps * sigma_A * N(0, 1)`` on its
selected set S and 0 on the rest of P, where ``sigma_A`` is the unbiased std of its active weights.
Per weight in PyTorch that is a dozen launches (masked mean, masked variance, the select); here two
reduction launches give every weight's ``sigma_A`` (mean first, then squared deviations from it,
as :func:`resu_compile.method.selective.initial_theta` computes it) and one launch writes
``W = where(S, scale * noise, where(M, W, 0))`` with the packed mask and selection read as bits
(:mod:`resu_compile.kernels.triton.theta_entry`).
The normal draws stay PyTorch's (one per weight, from the weight's own seeded generator), so the
draws do not depend on how the weights are batched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resu_compile.kernels.bits import unpack_bits
from resu_compile.kernels.launch import FLOAT_DTYPES, on_gpu


def active_sigma(
    params: Sequence[torch.Tensor], mask_bits: Sequence[torch.Tensor], active: Sequence[int]
) -> torch.Tensor:
    """fp32 ``[len(params)]``: the unbiased std of each weight's active coordinates (0 when fewer
    than two are active), ``active[i]`` being the number of set bits of ``mask_bits[i]``."""
    if _fused(params, mask_bits):
        from resu_compile.kernels.triton.theta_entry import active_sigma_triton

        return active_sigma_triton(params, mask_bits, active)
    device = params[0].device  # the first weight's, for a model spread over several devices
    return torch.stack(
        [
            _sigma_reference(p, unpack_bits(b, p.shape)).to(device)
            for p, b in zip(params, mask_bits, strict=True)
        ]
    )


def write_theta_(
    params: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor],
    select_bits: Sequence[torch.Tensor],
    noise: Sequence[torch.Tensor],
    scale: torch.Tensor,
) -> None:
    """``W = where(S, scale[i] * noise[i], where(M, W, 0))`` for every weight ``i``, in place;
    ``noise`` fp32 of each weight's shape, ``scale`` fp32 ``[len(params)]``."""
    if _fused(params, [*mask_bits, *select_bits, *noise]) and all(
        n.dtype == torch.float32 and n.is_contiguous() for n in noise
    ):
        from resu_compile.kernels.triton.theta_entry import write_theta_triton_

        write_theta_triton_(params, mask_bits, select_bits, noise, scale)
        return
    for i, param in enumerate(params):
        active = unpack_bits(mask_bits[i], param.shape)
        selected = unpack_bits(select_bits[i], param.shape)
        theta = (scale[i].to(param.device) * noise[i]).to(param.dtype)
        param.copy_(torch.where(selected, theta, param.masked_fill(~active, 0)))


def _fused(params: Sequence[torch.Tensor], others: Sequence[torch.Tensor]) -> bool:
    """One Triton launch serves these: contiguous weights of one supported dtype, one GPU."""
    return (
        len({p.dtype for p in params}) == 1
        and params[0].dtype in FLOAT_DTYPES
        and all(p.is_contiguous() and p.numel() for p in params)
        and on_gpu([*params, *others])
    )


def _sigma_reference(param: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``initial_theta``'s sigma: masked mean, then masked squared deviations, in fp32."""
    values = param.detach().float()
    count = active.sum()
    mean = torch.where(active, values, 0.0).sum() / count.clamp(min=1)
    variance = torch.where(active, (values - mean).square(), 0.0).sum() / (count - 1).clamp(min=1)
    return torch.where(count > 1, variance.sqrt(), 0.0)
