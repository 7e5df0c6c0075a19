"""Masked updates of one managed weight, with torch.optim's own state tensors and hyper-parameters.

SGD (momentum, dampening, nesterov, weight decay, maximize), Adam and AdamW are applied by our own
kernels, which read lr / betas / weight decay from the param group at every step (so LR schedulers
keep working) and keep the state in ``optimizer.state[param]`` under torch's names (so
``optimizer.state_dict()`` stays valid). Anything else takes the documented fallback: the
optimizer's own step on the masked gradient, then the mask re-applied to the weight and to every
state tensor shaped like it.

On CUDA the fused Triton kernels run; elsewhere the pure-PyTorch references (the test oracle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from resu_compile.kernels import reference


class UpdateKernels(NamedTuple):
    """The three update kernels for one device."""

    masked_sgd_: Callable[..., None]
    masked_adam_: Callable[..., None]
    theta_update_: Callable[..., None]


def kernels_for(param: torch.Tensor) -> UpdateKernels:
    """Fused Triton kernels for contiguous CUDA weights, the pure-PyTorch references otherwise."""
    if param.is_cuda and param.is_contiguous():
        from resu_compile.kernels import fused_update as fused

        return UpdateKernels(
            fused.fused_masked_sgd_, fused.fused_masked_adam_, fused.fused_theta_update_
        )
    return UpdateKernels(reference.masked_sgd_, reference.masked_adam_, reference.theta_update_)


def preserves_zeros(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a zero gradient on a zero weight with zero state leaves all three exactly zero.

    True for every configuration of SGD (momentum, dampening, nesterov, weight decay, maximize),
    Adam and AdamW (L2 or decoupled decay, amsgrad): each update term is a product with, or a
    quotient of, the gradient or the state. Other optimizers take the re-masking fallback.
    """
    return type(optimizer) in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def update_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> str | None:
    """ "sgd" or "adam" when our kernels reproduce this group's update exactly, else None."""
    if group.get("differentiable") or group.get("capturable"):
        return None
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and not group.get("amsgrad"):
        return "adam"
    return None


def _scalar(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class HostSteps:
    """Host copies of Adam's ``state["step"]`` counters.

    The kernels take the step as a host number (for the bias corrections). Fused and capturable
    Adam keep ``state["step"]`` on the GPU, where reading it every step would sync the device once
    per weight; the mirror reads it once (first use, or after the tensor was replaced by a reload)
    and counts on the host from then on, while the device counter is still advanced in place.
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[torch.Tensor, int]] = {}

    def advance(self, param: torch.Tensor, step: torch.Tensor) -> int:
        entry = self._seen.get(id(param))
        value = entry[1] if entry is not None and entry[0] is step else int(step.item())
        step += 1
        self._seen[id(param)] = (step, value + 1)
        return value + 1


def masked_update(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    param: torch.Tensor,
    grad: torch.Tensor,
    mask_bits: torch.Tensor | None,
    host_steps: HostSteps,
) -> None:
    """One optimizer step of ``param`` on its active coordinates; pruned ones end exactly 0."""
    rule = update_rule(optimizer, group)
    kernels = kernels_for(param)
    state = optimizer.state[param]
    if rule == "sgd":
        momentum = _scalar(group["momentum"])
        buffer = state.get("momentum_buffer")
        first_step = momentum != 0 and buffer is None
        if first_step:
            buffer = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["momentum_buffer"] = buffer
        kernels.masked_sgd_(
            param,
            grad,
            buffer if momentum != 0 else None,
            mask_bits,
            lr=_scalar(group["lr"]),
            momentum=momentum,
            dampening=_scalar(group["dampening"]),
            weight_decay=_scalar(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
            first_step=first_step,
        )
        return
    if rule == "adam":
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.optim.optimizer._get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        step = host_steps.advance(param, state["step"])
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        kernels.masked_adam_(
            param,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            mask_bits,
            step=step,
            lr=_scalar(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=_scalar(group["eps"]),
            weight_decay=_scalar(group["weight_decay"]),
            decoupled_weight_decay=bool(
                group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
            ),
            maximize=bool(group["maximize"]),
        )
        return
    raise ValueError(
        f"masked_update: {type(optimizer).__name__} has no masked kernel; use the fallback"
    )


def weight_shaped_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor
) -> list[torch.Tensor]:
    """Every optimizer state tensor of ``param`` with ``param``'s shape."""
    return [
        value
        for value in optimizer.state.get(param, {}).values()
        if isinstance(value, torch.Tensor) and value.shape == param.shape
    ]
