"""``resu::linear``: the custom op the rewrite emits with ``linear_op="resu"``.

A ``torch.library.custom_op`` with fake (shape) and autograd registrations, and an autocast rule
that follows the active autocast dtype, so it behaves like the aten linear it replaces under
Dynamo, AOTAutograd and Inductor. With in-place storage (METHOD.md section 1) the weight already
*is* ``W_eff``, so its kernel is the dense matmul on every device; it is the point where storage
modes that keep theta apart plug in a Triton matmul building ``W_eff`` tile by tile. Whether the
in-place path runs through it or through aten's linear is decided by benchmarks/overhead.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LIB = torch.library.Library("resu", "FRAGMENT")


@torch.library.custom_op("resu::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` with ``weight`` in (out, in) orientation (it holds ``W_eff``)."""
    return torch.nn.functional.linear(x, weight, bias)


@linear.register_fake
def _linear_fake(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_out: Tensor):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_out @ weight
    flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
    if ctx.needs_input_grad[1]:
        grad_w = flat_grad.t() @ x.reshape(-1, x.shape[-1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = flat_grad.sum(0)
    return grad_x, grad_w, grad_b


linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def _follow_autocast(op_name: str, device_type: str) -> None:
    """Autocast rule: cast floating inputs to the *current* autocast dtype, as aten.linear does.

    ``register_autocast`` fixes one dtype at registration; users pick fp16 or bf16 per region.
    """
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    overload = getattr(torch.ops.resu, op_name).default

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(value):
            if (
                isinstance(value, Tensor)
                and value.is_floating_point()
                and value.dtype != torch.float64
            ):
                return value.to(dtype)
            return value

        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return overload(*(cast(a) for a in args))

    _LIB.impl(op_name, kernel, key_name, with_keyset=True)


for _device in ("cpu", "cuda"):
    _follow_autocast("linear", _device)
