"""The resu custom op and the graph helpers: registrations (opcheck), gradients, autocast."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from resu_compile.kernels import ops  # noqa: F401
from resu_compile.kernels.bits import pack_bits
from resu_compile.kernels.graph_ops import accumulate_input_sq_norms, mask_gradient


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_shape", [(5,), (2, 3)])
def test_linear_op_registrations(bias: bool, batch_shape: tuple[int, ...]) -> None:
    x = torch.randn(*batch_shape, 7, requires_grad=True)
    weight = torch.randn(4, 7, requires_grad=True)
    b = torch.randn(4, requires_grad=True) if bias else None
    opcheck(torch.ops.resu.linear, (x, weight, b))


def test_linear_op_gradcheck_float64() -> None:
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.resu.linear, (x, weight, bias))
    assert torch.autograd.gradcheck(torch.ops.resu.linear, (x, weight.t().contiguous().t(), None))


def test_linear_op_equals_functional_linear() -> None:
    x, weight, bias = torch.randn(6, 5), torch.randn(3, 5), torch.randn(3)
    torch.testing.assert_close(
        torch.ops.resu.linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias)
    )


def test_linear_op_follows_the_active_autocast_dtype() -> None:
    x, weight = torch.randn(4, 8), torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.resu.linear(x, weight, None)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32


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
