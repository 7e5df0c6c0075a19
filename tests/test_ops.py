"""The resu custom ops: registrations (opcheck), gradients (gradcheck), autocast."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from resu_compile.kernels import ops  # noqa: F401


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


def test_accumulate_input_sq_norms_registrations_and_value() -> None:
    x = torch.randn(2, 3, 5)
    norms = torch.zeros(5)
    opcheck(torch.ops.resu.accumulate_input_sq_norms, (x, norms.clone()))
    torch.ops.resu.accumulate_input_sq_norms(x, norms)
    torch.ops.resu.accumulate_input_sq_norms(x, norms)
    torch.testing.assert_close(norms, 2 * x.reshape(-1, 5).pow(2).sum(0))
