"""The plan of one optimizer step, built by the controller from its phase and options and handed
to :class:`~resu_compile.optim.step.ManagedStep`, which holds no controller."""

from __future__ import annotations

from collections.abc import Callable

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
    graph_masked: bool,
    draws: Draws,
) -> StepPlan:
    """What the managed step does: masked updates of the actives, and in a RESU phase theta's
    update (``resu_steps`` RESU steps taken so far). ``graph_masked``: a compiled forward served
    the gradient-masking variant since the last step."""
    sharded = any(w.shard is not None for w in weights)
    return StepPlan(
        weights=weights,
        theta=theta_settings(config, resu_steps, draws) if in_resu else None,
        train_actives=not in_resu or not config.freeze_active,
        graph_masked=config.gradient_mask == "graph" and graph_masked,
        mask_in_optimizer=config.gradient_mask == "optimizer",
        freeze_others=config.freeze_others,
        raise_on_nonfinite=config.nan_policy == "raise",
        agree_nonfinite=(lambda flag: any_rank(flag, weights)) if sharded else None,
    )


def theta_settings(config: ResuConfig, resu_steps: int, draws: Draws) -> ThetaSettings:
    """Theta's update rule for the RESU step after ``resu_steps`` earlier ones; ``topk``
    selection re-selects at the first step and every ``refresh`` steps."""
    refresh = config.refresh
    return ThetaSettings(
        rule=config.theta_optimizer,
        lr=config.theta_lr,
        follow_lr_schedule=config.theta_lr_schedule == "optimizer",
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
