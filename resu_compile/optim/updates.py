"""Masked updates of the managed weights, with torch.optim's own state tensors and hyper-parameters.

SGD (momentum, dampening, nesterov, weight decay, maximize), Adam and AdamW are applied by our own
kernels, which read lr / betas / weight decay from the param group at every step (so LR schedulers
keep working) and keep the state in ``optimizer.state[param]`` under torch's names (so
``optimizer.state_dict()`` stays valid). Anything else takes the documented fallback: the
optimizer's own step on the masked gradient, then the mask re-applied to the weight and to every
state tensor shaped like it.

Each kernel family runs its Triton kernel on CUDA tensors (one launch per device and dtype) and its
pure-PyTorch reference elsewhere (:mod:`resu_compile.kernels.masked_sgd`, ``masked_adam``,
``theta_update``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import _get_scalar_dtype

from resu_compile.kernels.masked_adam import ThetaAdamW, masked_adam_
from resu_compile.kernels.masked_sgd import masked_sgd_
from resu_compile.kernels.theta_update import theta_update_
from resu_compile.shards import local

__all__ = [
    "AdamStepCounts",
    "ThetaAdamW",
    "masked_update",
    "preserves_zeros",
    "theta_update",
    "update_rule",
    "weight_shaped_state",
]


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


class AdamStepCounts:
    """Host copies of Adam's ``state["step"]`` counters.

    The kernels take the step as a host number (for the bias corrections). Fused and capturable
    Adam keep ``state["step"]`` on the GPU, where reading it every step would sync the device once
    per weight; the mirror reads it once (first use, after the tensor was replaced by a reload, or
    after :meth:`forget`) and counts on the host from then on, while the device counter is still
    advanced in place. Whoever lets the user's optimizer step a weight (which advances the counter
    behind the mirror's back) must :meth:`forget` it.
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[torch.Tensor, int]] = {}

    def forget(self, params: list[torch.Tensor]) -> None:
        """The next :meth:`advance` of these weights reads their counters again."""
        for param in params:
            self._seen.pop(id(param), None)

    def forget_all(self) -> None:
        self._seen.clear()

    def advance(self, params: list[torch.Tensor], steps: list[torch.Tensor]) -> list[int]:
        """Add 1 to every ``steps[i]`` (``params[i]``'s counter) and return the new counts.

        The device counters move in one ``_foreach_add_`` per device (a launch per weight would
        cost the host more than the update itself on models with many weights).
        """
        counts = []
        for param, step in zip(params, steps, strict=True):
            entry = self._seen.get(id(param))
            value = entry[1] + 1 if entry is not None and entry[0] is step else int(step.item()) + 1
            self._seen[id(param)] = (step, value)
            counts.append(value)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for step in steps:
            by_device.setdefault(step.device, []).append(step)
        for same_device in by_device.values():
            torch._foreach_add_(same_device, 1)
        return counts


def masked_update(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    mask_bits: list[torch.Tensor | None],
    step_counts: AdamStepCounts,
    found_inf: torch.Tensor | None = None,
    keep_pruned: bool = False,
    theta: ThetaAdamW | None = None,
) -> bool:
    """One optimizer step of ``group``'s managed ``params``: active coordinates as torch.optim
    steps them, pruned ones exactly 0 (or, ``keep_pruned``, untouched: the RESU phase keeps theta
    and its moments there). One launch per device and dtype on CUDA.

    ``found_inf`` (a device flag) makes the kernels leave everything as it was; Adam's step
    counter still advances on such a step (the kernels cannot tell the host without a sync).

    ``theta`` (with ``keep_pruned``; ``select_bits`` aligned with ``params``) asks for theta's
    AdamW on S in the same pass; returns whether it ran (Adam / AdamW with decoupled or no weight
    decay, no ``maximize``, a mask on every weight), else the caller still owes the theta step.
    """
    rule = update_rule(optimizer, group)
    states = [optimizer.state[p] for p in params]
    if rule == "sgd":
        _masked_sgd(group, params, grads, mask_bits, states, found_inf, keep_pruned)
        return False
    if rule == "adam":
        return _masked_adam(
            optimizer, group, params, grads, mask_bits, states, step_counts, found_inf,
            keep_pruned, theta,
        )  # fmt: skip
    raise ValueError(
        f"masked_update: {type(optimizer).__name__} has no masked kernel; use the fallback"
    )


def _masked_adam(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    mask_bits: list[torch.Tensor | None],
    states: list[dict[str, Any]],
    step_counts: AdamStepCounts,
    found_inf: torch.Tensor | None,
    keep_pruned: bool,
    theta: ThetaAdamW | None,
) -> bool:
    """:func:`masked_update` for Adam / AdamW: a launch per step count (they differ only
    rarely); whether theta's AdamW ran in the same pass."""
    for param, state in zip(params, states, strict=True):
        if not state:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    steps = step_counts.advance(params, [state["step"] for state in states])
    beta1, beta2 = (_scalar(b) for b in group["betas"])
    hyper = {
        "lr": _scalar(group["lr"]),
        "beta1": beta1,
        "beta2": beta2,
        "eps": _scalar(group["eps"]),
        "weight_decay": _scalar(group["weight_decay"]),
        "decoupled_weight_decay": bool(
            group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
        ),
        "maximize": bool(group["maximize"]),
    }
    same_pass = (
        theta is not None
        and keep_pruned
        and not hyper["maximize"]
        and (hyper["weight_decay"] == 0 or hyper["decoupled_weight_decay"])
        and all(b is not None for b in mask_bits)
    )
    for step in sorted(set(steps)):
        pick = [i for i, s in enumerate(steps) if s == step]
        masked_adam_(
            [local(params[i]) for i in pick],
            [local(grads[i]) for i in pick],
            [local(states[i]["exp_avg"]) for i in pick],
            [local(states[i]["exp_avg_sq"]) for i in pick],
            [mask_bits[i] for i in pick],
            step=step,
            found_inf=found_inf,
            keep_pruned=keep_pruned,
            theta=None
            if theta is None or not same_pass
            else theta._replace(select_bits=[theta.select_bits[i] for i in pick]),
            **hyper,
        )
    return same_pass


def _masked_sgd(
    group: dict[str, Any],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    mask_bits: list[torch.Tensor | None],
    states: list[dict[str, Any]],
    found_inf: torch.Tensor | None,
    keep_pruned: bool,
) -> None:
    """:func:`masked_update` for SGD: a launch per first-step flag (torch initialises the
    momentum buffer apart on a weight's first step)."""
    momentum = _scalar(group["momentum"])
    hyper = {
        "lr": _scalar(group["lr"]),
        "momentum": momentum,
        "dampening": _scalar(group["dampening"]),
        "weight_decay": _scalar(group["weight_decay"]),
        "nesterov": bool(group["nesterov"]),
        "maximize": bool(group["maximize"]),
    }
    first: list[bool] = []
    for param, state in zip(params, states, strict=True):
        first.append(momentum != 0 and state.get("momentum_buffer") is None)
        if first[-1]:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    for flag in sorted(set(first)):
        pick = [i for i, f in enumerate(first) if f == flag]
        masked_sgd_(
            [local(params[i]) for i in pick],
            [local(grads[i]) for i in pick],
            [local(states[i]["momentum_buffer"]) for i in pick] if momentum != 0 else None,
            [mask_bits[i] for i in pick],
            first_step=flag,
            found_inf=found_inf,
            keep_pruned=keep_pruned,
            **hyper,
        )


def theta_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    select_bits: list[torch.Tensor],
    exp_avgs: list[torch.Tensor | None],
    exp_avg_sqs: list[torch.Tensor | None],
    consistency: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    **hyper: Any,
) -> None:
    """The RESU phase's theta step for every managed weight (one launch per device and dtype on
    CUDA); with ``consistency`` (the statistics m, v of each weight) each gradient is weighted by
    ``C``. ``exp_avgs`` / ``exp_avg_sqs`` hold ``None`` where the rule keeps no such state."""
    theta_update_(
        [local(p) for p in params],
        [local(g) for g in grads],
        select_bits,
        exp_avgs=exp_avgs,  # type: ignore[arg-type]  # the rule's own states only are read
        exp_avg_sqs=exp_avg_sqs,  # type: ignore[arg-type]
        consistency_ms=consistency[0] if consistency else None,
        consistency_vs=consistency[1] if consistency else None,
        **hyper,
    )


def weight_shaped_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor
) -> list[torch.Tensor]:
    """Every optimizer state tensor of ``param`` with ``param``'s shape."""
    return [
        local(value)
        for value in optimizer.state.get(param, {}).values()
        if isinstance(value, torch.Tensor) and value.shape == param.shape
    ]
