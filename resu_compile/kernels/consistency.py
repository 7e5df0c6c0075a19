"""The consistency mode's statistics for every managed weight in one launch per dtype.

Each RESU step of the consistency mode (METHOD.md section 4) advances ``m = b*m + (1-b)*g`` and
``v = b*v + (1-b)*|g|`` on the pruned set P, then screens P by ``C = |m| / (v + delta) > tau``.
Weight by weight in PyTorch that is a dozen launches and several full-size temporaries per weight.
Here one pass reads ``g``, ``m``, ``v`` and the mask, stores the new statistics on P (other slots
keep their bits: they may hold the user's optimizer state) and writes ``P ∩ {C > tau}`` as packed
bits (:mod:`resu_compile.kernels.triton.consistency`), intersected with ``within`` when given (the
step's screen), so the selection reads one set of bits per weight. ``C`` itself is not kept: the
theta step recomputes it from the stored statistics
(:func:`resu_compile.kernels.theta_update.theta_update_`, ``consistency_ms``).
A set ``found_inf`` leaves the statistics as they were and selects nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resu_compile.kernels.bits import pack_bits, unpack_bits
from resu_compile.kernels.launch import FLOAT_DTYPES, on_gpu
from resu_compile.method.consistency import update_statistics_


def consistency_statistics_(
    grads: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor],
    *,
    beta: float,
    tau: float,
    found_inf: torch.Tensor | None = None,
    within: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Advance every weight's statistics on its pruned set; return each ``P ∩ {C > tau}`` packed
    (``∩ within[i]``, packed bits of the same size, when ``within`` is given).

    Contiguous CUDA tensors take one Triton launch per (device, dtype); anything else takes
    :func:`consistency_statistics_reference_`.
    """
    if not len(grads) == len(ms) == len(vs) == len(mask_bits):
        raise ValueError("consistency_statistics_: one grad, m, v and mask per weight")
    if within is not None and len(within) != len(grads):
        raise ValueError("consistency_statistics_: within needs one packed bit tensor per weight")
    out: list[torch.Tensor | None] = [None] * len(grads)
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype], list[int]] = {}
    for i, (g, m, v, bits) in enumerate(zip(grads, ms, vs, mask_bits, strict=True)):
        fused = (
            g.numel() > 0
            and all(t.is_contiguous() for t in (g, m, v, bits))
            and (within is None or (within[i].is_contiguous() and within[i].device == g.device))
            and m.dtype == v.dtype
            and m.dtype in FLOAT_DTYPES
            and g.dtype in FLOAT_DTYPES
            and on_gpu([g, m, v, bits])
        )
        if fused:
            groups.setdefault((g.device, m.dtype, g.dtype), []).append(i)
        else:
            out[i] = consistency_statistics_reference_(
                g,
                m,
                v,
                bits,
                beta=beta,
                tau=tau,
                found_inf=found_inf,
                within=None if within is None else within[i],
            )
    if groups:
        from resu_compile.kernels.triton.consistency import consistency_statistics_triton_

        for indices in groups.values():
            found = consistency_statistics_triton_(
                [grads[i] for i in indices],
                [ms[i] for i in indices],
                [vs[i] for i in indices],
                [mask_bits[i] for i in indices],
                beta=beta,
                tau=tau,
                found_inf=found_inf,
                within=None if within is None else [within[i] for i in indices],
            )
            for i, bits in zip(indices, found, strict=True):
                out[i] = bits
    return out  # type: ignore[return-value]


def consistency_statistics_reference_(
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    mask_bits: torch.Tensor,
    *,
    beta: float,
    tau: float,
    found_inf: torch.Tensor | None = None,
    within: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference for one weight: :func:`update_statistics_` on P, then ``P ∩ {C > tau}``
    (``∩ within``)."""
    pruned = ~unpack_bits(mask_bits, grad.shape).to(grad.device)
    if found_inf is not None:  # a skipped step leaves the statistics as they were
        pruned = pruned & ~found_inf.bool().to(grad.device)
        grad = grad.nan_to_num(0.0, 0.0, 0.0)
    c = update_statistics_(grad, m, v, pruned, beta)
    chosen = pruned & (c > tau)
    if within is not None:
        chosen &= unpack_bits(within, grad.shape).to(grad.device)
    return pack_bits(chosen)
