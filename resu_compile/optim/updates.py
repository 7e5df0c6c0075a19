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

from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import _get_scalar_dtype

from resu_compile.kernels import reference


def _fused(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this tensor (contiguous CUDA); else the reference does."""
    return tensor.is_cuda and tensor.is_contiguous()


def _batched(params: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
    """Whether one multi-tensor Triton launch can serve these weights: contiguous CUDA params and
    grads, one dtype each. Their states and bits are not looked at here: the per-weight kernels
    would refuse the same faults, so the launch's own checks raise for them instead (this runs every
    step, and the host time of a step counts on models whose step is bound by the host)."""
    dtype, grad_dtype = params[0].dtype, grads[0].dtype
    return all(
        _fused(p) and _fused(g) and p.dtype == dtype and g.dtype == grad_dtype
        for p, g in zip(params, grads, strict=True)
    )


def _run(name: str, lists: dict[str, list[Any]], **hyper: Any) -> None:
    """Call kernel ``name`` over per-weight ``lists``: one fused launch on CUDA, else per weight.

    ``name`` is the per-tensor reference / kernel name (``theta_update_``, ...); its multi-tensor
    Triton twin is ``fused_<name>multi_``, which takes the same arguments as lists (keyword ones
    pluralised, an all-None list as None). ``lists`` holds one entry per weight.
    """
    positional = _POSITIONAL[name]
    keywords = [key for key in lists if key not in positional]
    params = lists["param"]
    columns = {k: (None if all(v is None for v in vs) else vs) for k, vs in lists.items()}
    if params and _batched(params, lists["grad"]):
        from resu_compile.kernels import fused_update

        getattr(fused_update, f"fused_{name}multi_")(
            *(columns[k] for k in positional), **{f"{k}s": columns[k] for k in keywords}, **hyper
        )
        return
    for i, param in enumerate(params):
        if _fused(param):
            from resu_compile.kernels import fused_update

            kernel = getattr(fused_update, f"fused_{name}")
        else:
            kernel = getattr(reference, name)
        kernel(*(lists[k][i] for k in positional), **{k: lists[k][i] for k in keywords}, **hyper)


# Positional parameters of each kernel, in order (the rest are keyword arguments).
_POSITIONAL = {
    "masked_sgd_": ("param", "grad", "momentum_buffer", "mask_bits"),
    "masked_adam_": ("param", "grad", "exp_avg", "exp_avg_sq", "mask_bits"),
    "theta_update_": ("param", "grad", "select_bits"),
}


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


@dataclass(frozen=True)
class ThetaRider:
    """Theta's AdamW step on S (METHOD.md section 4), offered to :func:`masked_update` to run in
    the same pass as the actives' Adam step when one fused launch serves them both."""

    select_bits: dict[int, torch.Tensor]  # by id(param)
    lr: float
    step: int
    beta1: float
    beta2: float
    weight_decay: float


AdamStepCounts = HostSteps


@dataclass(frozen=True)
class ThetaAdamW:
    select_bits: list[torch.Tensor]
    lr: float
    step: int
    beta1: float
    beta2: float
    weight_decay: float


def masked_update(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    mask_bits: list[torch.Tensor | None],
    host_steps: HostSteps,
    found_inf: torch.Tensor | None = None,
    keep_pruned: bool = False,
    theta: ThetaRider | None = None,
) -> bool:
    """One optimizer step of ``group``'s managed ``params``: active coordinates as torch.optim
    steps them, pruned ones exactly 0 (or, ``keep_pruned``, untouched: the RESU phase keeps theta
    and its moments there). One fused launch for all of them on CUDA where possible.

    ``found_inf`` (a device flag) makes the kernels leave everything as it was; Adam's step
    counter still advances on such a step (the kernels cannot tell the host without a sync).

    ``theta`` (with ``keep_pruned``) asks for theta's AdamW on S in the same launch; returns
    whether it ran (only Adam / AdamW with decoupled or no weight decay, no ``maximize``, all on
    one CUDA launch), else the caller still owes the theta step.
    """
    if isinstance(theta, ThetaAdamW):
        theta = ThetaRider(
            {id(p): b for p, b in zip(params, theta.select_bits, strict=True)},
            theta.lr,
            theta.step,
            theta.beta1,
            theta.beta2,
            theta.weight_decay,
        )
    rule = update_rule(optimizer, group)
    states = [optimizer.state[p] for p in params]
    if rule == "sgd":
        momentum = _scalar(group["momentum"])
        hyper = {
            "lr": _scalar(group["lr"]),
            "momentum": momentum,
            "dampening": _scalar(group["dampening"]),
            "weight_decay": _scalar(group["weight_decay"]),
            "nesterov": bool(group["nesterov"]),
            "maximize": bool(group["maximize"]),
        }
        buffers: list[torch.Tensor | None] = []
        first: list[bool] = []
        for param, state in zip(params, states, strict=True):
            first.append(momentum != 0 and state.get("momentum_buffer") is None)
            if first[-1]:
                state["momentum_buffer"] = torch.zeros_like(
                    param, memory_format=torch.preserve_format
                )
            buffers.append(state["momentum_buffer"] if momentum != 0 else None)
        for flag in sorted(set(first)):  # a launch per first-step flag (torch initialises apart)
            pick = [i for i, f in enumerate(first) if f == flag]
            _run(
                "masked_sgd_",
                {
                    "param": [params[i] for i in pick],
                    "grad": [grads[i] for i in pick],
                    "momentum_buffer": [buffers[i] for i in pick],
                    "mask_bits": [mask_bits[i] for i in pick],
                },
                first_step=flag,
                found_inf=found_inf,
                keep_pruned=keep_pruned,
                **hyper,
            )
        return False
    if rule == "adam":
        for param, state in zip(params, states, strict=True):
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        steps = host_steps.advance(params, [state["step"] for state in states])
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
        rider = keep_pruned and theta is not None and _rides(theta, hyper, params, grads, mask_bits)
        for step in sorted(set(steps)):  # a launch per step count (they differ only rarely)
            pick = [i for i, s in enumerate(steps) if s == step]
            if rider:
                _fused_with_theta(
                    theta, pick, params, grads, states, mask_bits, hyper, step, found_inf
                )
                continue
            _run(
                "masked_adam_",
                {
                    "param": [params[i] for i in pick],
                    "grad": [grads[i] for i in pick],
                    "exp_avg": [states[i]["exp_avg"] for i in pick],
                    "exp_avg_sq": [states[i]["exp_avg_sq"] for i in pick],
                    "mask_bits": [mask_bits[i] for i in pick],
                },
                step=step,
                found_inf=found_inf,
                keep_pruned=keep_pruned,
                **hyper,
            )
        return rider
    raise ValueError(
        f"masked_update: {type(optimizer).__name__} has no masked kernel; use the fallback"
    )


def _rides(
    theta: ThetaRider,
    hyper: dict[str, Any],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    mask_bits: list[torch.Tensor | None],
) -> bool:
    """Whether theta's step can share the actives' fused launch."""
    if hyper["maximize"] or (hyper["weight_decay"] != 0 and not hyper["decoupled_weight_decay"]):
        return False
    selections = [theta.select_bits.get(id(p)) for p in params]
    if any(b is None for b in [*mask_bits, *selections]):
        return False
    return _batched(params, grads)


def _fused_with_theta(
    theta: ThetaRider,
    pick: list[int],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    mask_bits: list[torch.Tensor | None],
    hyper: dict[str, Any],
    step: int,
    found_inf: torch.Tensor | None,
) -> None:
    from resu_compile.kernels.fused_update import ThetaAdamW, fused_masked_adam_multi_

    rider = ThetaAdamW(
        [theta.select_bits[id(params[i])] for i in pick],
        lr=theta.lr,
        step=theta.step,
        beta1=theta.beta1,
        beta2=theta.beta2,
        weight_decay=theta.weight_decay,
    )
    fused_masked_adam_multi_(
        [params[i] for i in pick],
        [grads[i] for i in pick],
        [states[i]["exp_avg"] for i in pick],
        [states[i]["exp_avg_sq"] for i in pick],
        [mask_bits[i] for i in pick],  # type: ignore[misc]
        step=step,
        found_inf=found_inf,
        keep_pruned=True,
        theta=rider,
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
    """The RESU phase's theta step for every managed weight (one fused launch on CUDA); with
    ``consistency`` (the statistics m, v of each weight) each gradient is weighted by ``C``."""
    none = [None] * len(params)
    _run(
        "theta_update_",
        {
            "param": params,
            "grad": grads,
            "select_bits": select_bits,
            "exp_avg": exp_avgs,
            "exp_avg_sq": exp_avg_sqs,
            "consistency_m": consistency[0] if consistency else none,
            "consistency_v": consistency[1] if consistency else none,
        },
        **hyper,
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
