"""The masked Adam / AdamW step of many weights, with theta's AdamW optionally in the same pass.

:func:`masked_adam_` runs one Triton launch per (device, dtype) group of CUDA tensors
(:mod:`resu_compile.kernels.triton.masked_adam`) and :func:`masked_adam_reference_` on everything
else; the reference is bit-identical to ``torch.optim.Adam`` / ``AdamW`` on fp32 active coordinates
(:mod:`resu_compile.kernels.update_math`).

The one-pass RESU step: in the RESU phase with trainable actives (``keep_pruned``), theta lives in
the pruned slots of the same weights and optimizer states. Given a :class:`ThetaAdamW`, the kernel
also applies theta's AdamW (METHOD.md section 4) to the selected pruned coordinates while it holds
them, one read and write of every tensor instead of two; the arithmetic is that of the actives'
step followed by :func:`resu_compile.kernels.theta_update.theta_update_` (rule ``adamw``), bit for
bit (see ``launch.FP_FUSION``), which is also what the reference path runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resu_compile.kernels.bits import unpack_bits
from resu_compile.kernels.launch import on_gpu, pick, route
from resu_compile.kernels.theta_update import theta_update_reference_
from resu_compile.kernels.update_math import ThetaAdamW, adam_math_, skip_step, work, write_back


def masked_adam_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor | None] | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    found_inf: torch.Tensor | None = None,
    keep_pruned: bool = False,
    theta: ThetaAdamW | None = None,
) -> None:
    """One ``torch.optim.Adam`` (``decoupled_weight_decay``: ``AdamW``) step of every weight on its
    active coordinates, and with ``theta`` theta's AdamW on the selected pruned ones.

    Lists hold one tensor per weight; ``mask_bits`` may be ``None`` for all (or hold ``None`` for
    a dense weight). Arguments as in :func:`masked_adam_reference_`; a nonzero ``found_inf`` (one
    fp32 or bool element on the weights' device) skips the step. ``theta`` needs
    ``keep_pruned=True``, a mask for every weight, ``maximize=False`` and decoupled (or zero)
    weight decay: the conditions under which both steps share one pass. (Over 60 lines: its
    arguments, one a line.)
    """
    bits = [None] * len(params) if mask_bits is None else mask_bits
    if theta is not None and (
        not keep_pruned
        or any(b is None for b in bits)
        or maximize
        or (weight_decay != 0 and not decoupled_weight_decay)
    ):
        raise ValueError(
            "masked_adam_: theta needs keep_pruned=True, mask_bits, maximize=False "
            "and decoupled (or zero) weight decay"
        )
    hyper = dict(
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        maximize=maximize,
        found_inf=found_inf,
        keep_pruned=keep_pruned,
    )
    groups, rest = route(params, grads, on_gpu, [bits])
    if groups:
        from resu_compile.kernels.triton.masked_adam import masked_adam_triton_

        for indices in groups:
            masked_adam_triton_(
                pick(params, indices),
                pick(grads, indices),
                pick(exp_avgs, indices),
                pick(exp_avg_sqs, indices),
                None if bits[indices[0]] is None else pick(bits, indices),
                theta=None
                if theta is None
                else theta._replace(select_bits=pick(theta.select_bits, indices)),
                **hyper,
            )
    for i in rest:
        masked_adam_reference_(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], bits[i], **hyper)
        if theta is not None:
            theta_update_reference_(
                params[i], grads[i], theta.select_bits[i], rule="adamw", lr=theta.lr,
                step=theta.step, exp_avg=exp_avgs[i], exp_avg_sq=exp_avg_sqs[i],
                beta1=theta.beta1, beta2=theta.beta2, eps=theta.eps,
                weight_decay=theta.weight_decay, found_inf=found_inf,
            )  # fmt: skip


def masked_adam_reference_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask_bits: torch.Tensor | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    found_inf: torch.Tensor | None = None,
    keep_pruned: bool = False,
) -> None:
    """One ``torch.optim.Adam`` (or, decoupled, ``AdamW``) step on the active coordinates.

    ``step`` counts steps after the increment (1 on the first step), as torch.optim stores it.
    Pruned coordinates of the parameter and of both moments end at exactly 0, or with
    ``keep_pruned`` stay as they were. A set ``found_inf`` skips the step.
    """
    if skip_step(found_inf):
        return
    active = None if mask_bits is None else unpack_bits(mask_bits, param.shape)
    kept = [t.clone() for t in (param, exp_avg, exp_avg_sq)] if keep_pruned else None
    p, m, v = work(param), work(exp_avg), work(exp_avg_sq)
    g = work(grad)
    if maximize:
        g = -g
    adam_math_(
        p,
        g,
        m,
        v,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
    )
    write_back([(param, p), (exp_avg, m), (exp_avg_sq, v)], active, kept)
