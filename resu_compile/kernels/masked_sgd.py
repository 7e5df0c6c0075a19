"""The masked SGD step of many weights: torch.optim.SGD on the active coordinates, bits for masks.

:func:`masked_sgd_` runs one Triton launch per (device, dtype) group of CUDA tensors
(:mod:`resu_compile.kernels.triton.masked_sgd`: one read and write of every tensor plus N/8 bytes
of mask, the traffic of a plain fused optimizer) and :func:`masked_sgd_reference_` on everything
else. The reference is the oracle the kernel is tested against, and bit-identical to
``torch.optim.SGD`` on fp32 active coordinates (:mod:`resu_compile.kernels.update_math`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resu_compile.kernels.bits import unpack_bits
from resu_compile.kernels.launch import on_gpu, pick, route
from resu_compile.kernels.update_math import skip_step, work, write_back


def masked_sgd_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    mask_bits: Sequence[torch.Tensor | None] | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    found_inf: torch.Tensor | None = None,
    keep_pruned: bool = False,
) -> None:
    """One ``torch.optim.SGD`` step of every ``params[i]`` on its active coordinates.

    Lists hold one tensor per weight; ``mask_bits`` (packed, or ``None`` for a dense weight) may be
    ``None`` for all, as may ``momentum_buffers`` without momentum. Arguments as in
    :func:`masked_sgd_reference_`; a nonzero ``found_inf`` (one fp32 or bool element on the
    weights' device) skips the step, on the device where the Triton kernel serves it.
    """
    has_momentum = momentum != 0
    if has_momentum and (momentum_buffers is None or any(b is None for b in momentum_buffers)):
        raise ValueError("masked_sgd_: momentum != 0 needs a momentum_buffer for every weight")
    hyper = dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        first_step=first_step,
        found_inf=found_inf,
        keep_pruned=keep_pruned,
    )
    bits = [None] * len(params) if mask_bits is None else mask_bits
    groups, rest = route(params, grads, on_gpu, [bits])
    if groups:
        from resu_compile.kernels.triton.masked_sgd import masked_sgd_triton_

        for indices in groups:
            masked_sgd_triton_(
                pick(params, indices),
                pick(grads, indices),
                pick(momentum_buffers if has_momentum else None, indices),
                None if bits[indices[0]] is None else pick(bits, indices),
                **hyper,
            )
    for i in rest:
        buffer = momentum_buffers[i] if has_momentum else None  # type: ignore[index]
        masked_sgd_reference_(params[i], grads[i], buffer, bits[i], **hyper)


def masked_sgd_reference_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    mask_bits: torch.Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    found_inf: torch.Tensor | None = None,
    keep_pruned: bool = False,
) -> None:
    """One ``torch.optim.SGD`` step on the active coordinates; pruned ones end at exactly 0.

    ``first_step`` initialises the momentum buffer as torch does (a copy of the decayed gradient,
    dampening ignored). ``grad`` is never modified. A set ``found_inf`` skips the step.
    ``keep_pruned`` leaves the pruned coordinates of the parameter and the buffer as they were
    (the RESU phase with trainable actives: theta and its moments live there).
    """
    if momentum != 0 and momentum_buffer is None:
        raise ValueError("masked_sgd_: momentum != 0 needs a momentum_buffer")
    if skip_step(found_inf):
        return
    active = None if mask_bits is None else unpack_bits(mask_bits, param.shape)
    kept = [param.clone()] if keep_pruned else None
    if kept is not None and momentum_buffer is not None:
        kept.append(momentum_buffer.clone())
    p = work(param)
    g = work(grad)
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    pairs = [(param, p)]
    if momentum != 0:
        assert momentum_buffer is not None
        buf = work(momentum_buffer)
        if first_step:
            buf.copy_(g)
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if nesterov else buf
        pairs.append((momentum_buffer, buf))
    p.add_(g, alpha=-lr)
    write_back(pairs, active, kept)
