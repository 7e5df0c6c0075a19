"""The graph helpers the rewrite inserts: the input-norm accumulation and the gradient mask."""

from __future__ import annotations

import torch

from resu_compile.kernels.bits import pack_bits
from resu_compile.kernels.graph_ops import accumulate_input_sq_norms, mask_gradient


def test_accumulate_input_sq_norms_adds_squared_column_norms() -> None:
    x = torch.randn(2, 3, 5)
    norms = torch.zeros(5)
    accumulate_input_sq_norms(x, norms)
    accumulate_input_sq_norms(x, norms)
    torch.testing.assert_close(norms, 2 * x.reshape(-1, 5).pow(2).sum(0))


def test_mask_gradient_is_identity_forward_and_masks_the_gradient() -> None:
    weight = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(7, 5) < 0.5
    bits = pack_bits(keep)
    masked = mask_gradient(weight, bits)
    assert torch.equal(masked, weight)
    upstream = torch.randn(7, 5, dtype=torch.float64)
    upstream[0, 0] = float("nan")  # a non-finite gradient on a pruned slot must not survive
    keep[0, 0] = False
    bits = pack_bits(keep)
    (grad,) = torch.autograd.grad(mask_gradient(weight, bits), weight, upstream)
    assert torch.equal(grad, torch.where(keep, upstream, torch.zeros_like(upstream)))
