"""The pieces the rewrite inserts into graph variants.

The gradient mask is written in aten ops on purpose: Inductor sees through it and fuses it into
the elementwise kernel that already touches the weight gradient (the bias-gradient reduction, or
the bf16 -> fp32 cast under autocast); an opaque op would cost a pass over memory of its own. The
input-norm reduction is the opposite case: a reduction down an activation's columns, which an
opaque kernel does in one read (:mod:`resu_compile.kernels.column_norms`).
"""

from __future__ import annotations

import torch

from resu_compile.kernels.bits import unpack_bits
from resu_compile.kernels.column_norms import column_sq_sums


class _MaskGradient(torch.autograd.Function):
    """Identity on the weight; the gradient is zeroed where the packed mask bit is 0."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(bits)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (bits,) = ctx.saved_tensors
        keep = unpack_bits(bits, grad.shape)
        # ``where`` rather than a product: a NaN or Inf gradient on a pruned slot is dropped too.
        return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None


def mask_gradient(weight: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``weight`` unchanged in the forward pass; its gradient is 0 wherever ``bits`` says pruned.

    With the gradient exactly 0 on the pruned set, SGD (momentum, nesterov), Adam and AdamW keep
    pruned weights and their state exactly 0 by themselves, fused multi-tensor kernels included.
    """
    return _MaskGradient.apply(weight, bits)


def accumulate_input_sq_norms(x: torch.Tensor, *sq_norms: torch.Tensor) -> None:
    """Add each input feature's squared L2 norm over all tokens (Wanda's ``||X_j||^2``) to every
    buffer in ``sq_norms`` (one per weight that reads ``x``), reducing ``x`` once."""
    values = column_sq_sums(x.detach())
    for buffer in sq_norms:
        buffer.add_(values)
