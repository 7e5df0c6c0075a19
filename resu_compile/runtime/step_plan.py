"""The plan of one optimizer step, built by the controller from its phase and options and handed
to :class:`~resu_compile.optim.step.ManagedStep`, which holds no controller."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from resu_compile.config import ResuConfig
from resu_compile.optim.step import StepPlan
from resu_compile.optim.theta import ThetaSettings
from resu_compile.runtime.distributed import any_rank
from resu_compile.state import ManagedWeight

#: ``(weight, purpose) -> generator`` seeded for reproducible draws (the controller's).
Draws = Callable[[ManagedWeight, str], torch.Generator]


def plan_step(
    config: ResuConfig,
    weights: list[ManagedWeight],
    *,
    in_resu: bool,
    resu_steps: int,
    lr_scale: float,
    graph_masked: bool,
    draws: Draws,
) -> StepPlan:
    """What the managed step does: masked updates of the actives, and in a RESU phase theta's
    update (``resu_steps`` RESU steps taken so far, its rate ``theta_lr * lr_scale``, see
    :func:`theta_lr_scale`). ``graph_masked``: a compiled forward served
    the gradient-masking variant since the last step."""
    sharded = any(w.shard is not None for w in weights)
    return StepPlan(
        weights=weights,
        theta=theta_settings(config, resu_steps, draws, lr_scale) if in_resu else None,
        train_actives=not in_resu or not config.freeze_active,
        graph_masked=config.gradient_mask == "graph" and graph_masked,
        mask_in_optimizer=config.gradient_mask == "optimizer",
        freeze_others=config.freeze_others,
        raise_on_nonfinite=config.nan_policy == "raise",
        agree_nonfinite=(lambda flag: any_rank(flag, weights)) if sharded else None,
    )


def theta_lr_scale(
    config: ResuConfig,
    weights: list[ManagedWeight],
    group_of: Callable[[ManagedWeight], dict[str, Any] | None],
) -> float:
    """What ``theta_lr`` is multiplied by this step: 1 under ``theta_lr_schedule="constant"``;
    under ``"optimizer"`` the managed weights' rate over the ``initial_lr`` torch's LR schedulers
    record, so theta warms up and decays with the actives it competes against (1 for a param
    group no scheduler drives: its rate is taken as constant). ``group_of`` gives a weight's
    param group (None for a frozen weight the optimizer does not hold)."""
    if config.theta_lr_schedule == "constant":
        return 1.0
    groups = [group for group in map(group_of, weights) if group is not None]
    scales = [
        float(g["lr"]) / float(g["initial_lr"]) if g.get("initial_lr") else 1.0 for g in groups
    ]
    low, high = min(scales, default=1.0), max(scales, default=1.0)
    if high - low > 1e-6 * max(abs(high), 1e-12):
        raise ValueError(
            "theta_lr_schedule='optimizer' needs one schedule for every managed weight, but their "
            f"param groups are at different fractions of their initial lr ({low:g} to {high:g}); "
            "use theta_lr_schedule='constant'"
        )
    return high


def theta_settings(
    config: ResuConfig, resu_steps: int, draws: Draws, lr_scale: float
) -> ThetaSettings:
    """Theta's update rule for the RESU step after ``resu_steps`` earlier ones (its rate
    ``theta_lr * lr_scale``); ``topk`` selection re-selects at the first step and every
    ``refresh`` steps."""
    refresh = config.refresh
    return ThetaSettings(
        rule=config.theta_optimizer,
        lr=config.theta_lr * lr_scale,
        beta1=config.theta_betas[0],
        beta2=config.theta_betas[1],
        weight_decay=config.theta_weight_decay,
        step=resu_steps + 1,
        selection=config.selection,
        alpha=config.alpha,
        screen_fraction=config.screen_fraction,
        consistency_tau=config.consistency_tau,
        consistency_beta=config.consistency_beta,
        init_eps=config.theta_init_eps,
        reselect=config.selection == "topk"
        and (resu_steps == 0 or (refresh > 0 and resu_steps % refresh == 0)),
        draws=draws,
    )
