"""The RESU phase's theta step of many weights: sgd, momentum or AdamW on the selected set only.

:func:`theta_update_` runs one Triton launch per (device, dtype) group of CUDA tensors
(:mod:`resu_compile.kernels.triton.theta_update`) and :func:`theta_update_reference_` on everything
else. Every coordinate whose select bit is 0 keeps its bits in the parameter and in the state
tensors: frozen weights receive no update of any kind. In consistency mode (METHOD.md section 4)
the gradient is weighted by ``C = |m| / (v + delta)`` from the stored statistics, inside the step
(no ``C * g`` temporaries).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resu_compile.kernels.bits import unpack_bits
from resu_compile.kernels.launch import on_gpu, pick, route
from resu_compile.kernels.update_math import (
    adam_math_,
    check_consistency_args,
    check_theta_args,
    skip_step,
)
from resu_compile.method.consistency import DELTA


def theta_update_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    select_bits: Sequence[torch.Tensor],
    *,
    rule: str,
    lr: float,
    step: int,
    exp_avgs: Sequence[torch.Tensor] | None = None,
    exp_avg_sqs: Sequence[torch.Tensor] | None = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    found_inf: torch.Tensor | None = None,
    consistency_ms: Sequence[torch.Tensor] | None = None,
    consistency_vs: Sequence[torch.Tensor] | None = None,
    delta: float = DELTA,
) -> None:
    """The theta step of every ``params[i]`` on its selection ``select_bits[i]``.

    ``exp_avgs`` / ``exp_avg_sqs`` are lists (one state per weight) where the rule needs them,
    ``consistency_ms`` / ``consistency_vs`` in consistency mode; the rules are those of
    :func:`theta_update_reference_`. A nonzero ``found_inf`` skips the step. (Over 60 lines: its
    arguments, one a line.)
    """
    check_theta_args(rule, exp_avgs, exp_avg_sqs)
    check_consistency_args(consistency_ms, consistency_vs)
    if rule == "sgd":
        exp_avgs = None
    if rule != "adamw":
        exp_avg_sqs = None
    hyper = dict(
        rule=rule,
        lr=lr,
        step=step,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        found_inf=found_inf,
        delta=delta,
    )
    optional = (exp_avgs, exp_avg_sqs, consistency_ms, consistency_vs)
    groups, rest = route(params, grads, on_gpu)
    if groups:
        from resu_compile.kernels.triton.theta_update import theta_update_triton_

        for indices in groups:
            m, v, cm, cv = (pick(values, indices) for values in optional)
            theta_update_triton_(
                pick(params, indices),
                pick(grads, indices),
                pick(select_bits, indices),
                exp_avgs=m,
                exp_avg_sqs=v,
                consistency_ms=cm,
                consistency_vs=cv,
                **hyper,
            )
    for i in rest:
        m, v, cm, cv = (None if values is None else values[i] for values in optional)
        theta_update_reference_(
            params[i],
            grads[i],
            select_bits[i],
            exp_avg=m,
            exp_avg_sq=v,
            consistency_m=cm,
            consistency_v=cv,
            **hyper,
        )


def theta_update_reference_(
    param: torch.Tensor,
    grad: torch.Tensor,
    select_bits: torch.Tensor,
    *,
    rule: str,
    lr: float,
    step: int,
    exp_avg: torch.Tensor | None = None,
    exp_avg_sq: torch.Tensor | None = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    found_inf: torch.Tensor | None = None,
    consistency_m: torch.Tensor | None = None,
    consistency_v: torch.Tensor | None = None,
    delta: float = DELTA,
) -> None:
    """The RESU-phase theta step (METHOD.md section 4) on the selected coordinates only. Rules:

    - ``sgd``: ``theta -= lr * (g + wd * theta)``;
    - ``momentum``: EMA form ``m = b1*m + (1-b1)*g``, ``theta -= lr*m`` (``exp_avg`` holds ``m``;
      a non-zero ``weight_decay`` is added to ``g`` as in ``sgd``);
    - ``adamw``: bias-corrected AdamW with decoupled weight decay (``exp_avg``, ``exp_avg_sq``).

    In consistency mode (``consistency_m``, ``consistency_v``: the statistics) the gradient is
    weighted by ``C = |m| / (v + delta)``. A set ``found_inf`` skips the step. (Over 60 lines: its
    arguments, one a line, and the three rules.)
    """
    check_theta_args(rule, exp_avg, exp_avg_sq)
    consistency = check_consistency_args(consistency_m, consistency_v)
    if skip_step(found_inf):
        return
    sel = unpack_bits(select_bits, param.shape)
    theta = param[sel].float()
    g = grad[sel].float()
    if consistency:
        cm, cv = consistency_m[sel].float(), consistency_v[sel].float()  # type: ignore[index]
        g = g * (cm.abs() / (cv + delta))
    if rule == "adamw":
        assert exp_avg is not None and exp_avg_sq is not None
        m, v = exp_avg[sel].float(), exp_avg_sq[sel].float()
        adam_math_(
            theta,
            g,
            m,
            v,
            step=step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=True,
        )
        exp_avg[sel] = m.to(exp_avg.dtype)
        exp_avg_sq[sel] = v.to(exp_avg_sq.dtype)
    else:
        if weight_decay != 0:
            g = g.add(theta, alpha=weight_decay)
        if rule == "momentum":
            assert exp_avg is not None
            m = exp_avg[sel].float()
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            exp_avg[sel] = m.to(exp_avg.dtype)
            g = m
        theta.add_(g, alpha=-lr)
    param[sel] = theta.to(param.dtype)
