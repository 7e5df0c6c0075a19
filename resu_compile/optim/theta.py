"""The RESU phase's theta step: theta on the trainable set S, by the selective mode's rules.

Theta's state lives where :mod:`resu_compile.optim.slots` says. In ``consistency`` mode the step's
subset I is chosen here, from this step's gradient (METHOD.md section 4), for every weight at once:
one statistics launch and two segmented top-k selections on the GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from resu_compile.kernels.bits import pack_bits
from resu_compile.kernels.consistency import consistency_statistics_
from resu_compile.kernels.segmented_topk import topk_bits
from resu_compile.method.selective import initial_theta, select_trainable
from resu_compile.optim.slots import consistency_statistics, theta_moments
from resu_compile.optim.updates import ThetaAdamW, theta_update
from resu_compile.state import ManagedWeight

#: The consistency mode's per-step top-k's rank ``|g|`` by this many key bits (16: bfloat16).
SELECTION_KEY_BITS = 16

#: A seeded generator for one draw of one weight (the runtime seeds by name, cycle and purpose).
Draws = Callable[[ManagedWeight, str], torch.Generator]


@dataclass(frozen=True)
class ThetaSettings:
    """The theta rule of one RESU step (METHOD.md section 4), as the runtime hands it over."""

    rule: str  # "sgd", "momentum" or "adamw"
    lr: float
    #: theta_lr_schedule="optimizer": each weight's theta runs at ``lr`` times its param group's
    #: current lr over the ``initial_lr`` its LR scheduler recorded (:func:`lr_fraction`).
    follow_lr_schedule: bool
    beta1: float
    beta2: float
    weight_decay: float
    step: int  # 1 at the phase's first step (AdamW's bias correction)
    selection: str  # "random", "all", "topk" or "consistency"
    alpha: float
    screen_fraction: float
    consistency_tau: float
    consistency_beta: float
    init_eps: float
    #: topk: this step re-chooses S from ``|G|`` (the phase's first step, then every ``refresh``).
    reselect: bool
    draws: Draws

    def for_group(self, group: Mapping[str, Any]) -> ThetaSettings:
        """The settings of the weights of one param group: its rate scaled by the group's
        schedule when theta follows it."""
        if not self.follow_lr_schedule:
            return self
        return dataclasses.replace(self, lr=self.lr * lr_fraction(group))

    @property
    def fixed_selection(self) -> bool:
        """Whether S stays as chosen at entry for the whole step (random, all)."""
        return self.selection in ("random", "all")

    def same_pass(self, weights: Sequence[ManagedWeight]) -> ThetaAdamW | None:
        """Theta's AdamW for the actives' masked Adam launch to run in the same pass, or None
        where it cannot: it must be AdamW on the optimizer's own slots with S fixed."""
        if self.rule != "adamw" or not self.fixed_selection:
            return None
        if any(w.select_bits is None or w.theta_private for w in weights):
            return None
        return ThetaAdamW(
            [w.select_bits for w in weights],  # type: ignore[misc]
            lr=self.lr,
            step=self.step,
            beta1=self.beta1,
            beta2=self.beta2,
            weight_decay=self.weight_decay,
        )


def lr_fraction(group: Mapping[str, Any]) -> float:
    """A param group's current lr over the ``initial_lr`` torch's LR schedulers record when they
    attach (1 for a group no scheduler drives: its rate is taken as constant), so theta warms up
    and decays with the actives it competes against."""
    initial = group.get("initial_lr")
    return float(group["lr"]) / float(initial) if initial else 1.0


@torch.no_grad()
def theta_step(
    optimizer: torch.optim.Optimizer,
    weights: Sequence[ManagedWeight],
    grads: Sequence[torch.Tensor],
    settings: ThetaSettings,
    found_inf: torch.Tensor | None,
) -> None:
    """Update theta on S (in consistency mode on this step's subset I, by ``C * g``)."""
    moments = [theta_moments(optimizer, w, settings.rule, settings.selection) for w in weights]
    if settings.reselect:
        for weight, grad, pair in zip(weights, grads, moments, strict=True):
            restart = _reselect_by_gradient(weight, grad, settings)
            for moment in pair:
                if moment is not None:
                    moment.masked_fill_(restart, 0)
    consistency = None
    if settings.selection == "consistency":
        bits, consistency = _consistent_selection(optimizer, weights, grads, settings, found_inf)
    else:
        bits = [w.select_bits for w in weights]
    theta_update(
        [w.param for w in weights],
        list(grads),
        bits,
        [first for first, _ in moments],
        [second for _, second in moments],
        consistency,
        rule=settings.rule,
        lr=settings.lr,
        step=settings.step,
        beta1=settings.beta1,
        beta2=settings.beta2,
        weight_decay=settings.weight_decay,
        found_inf=found_inf,
    )


def _reselect_by_gradient(
    weight: ManagedWeight, gradient: torch.Tensor, settings: ThetaSettings
) -> torch.Tensor:
    """``topk``: S becomes the top ``alpha`` of P by ``|G|``; coordinates that join S get a fresh
    theta draw, those that leave it go back to 0. Returns the coordinates whose theta-optimizer
    state must restart (joined or left)."""
    mask = weight.mask()
    new, count = select_trainable(
        ~mask,
        "topk",
        settings.alpha,
        settings.draws(weight, "select"),
        weight.numel - weight.active_count(),
        gradient=gradient,
    )
    old = weight.selection()
    joined, left = new & ~old, old & ~new
    theta = initial_theta(
        weight.param, mask, settings.init_eps, settings.draws(weight, f"theta{settings.step - 1}")
    )
    weight.param.copy_(torch.where(joined, theta, weight.param.masked_fill(left, 0)))
    weight.set_selection(pack_bits(new), count)
    return joined | left


def _consistent_selection(
    optimizer: torch.optim.Optimizer,
    weights: Sequence[ManagedWeight],
    grads: Sequence[torch.Tensor],
    settings: ThetaSettings,
    found_inf: torch.Tensor | None,
) -> tuple[list[torch.Tensor], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Advance m, v on P and choose this step's subset I of every weight:
    ``I = TopK(|g|, k_select)`` within ``TopK(|g|, k_screen) ∩ {C > tau}``.

    Returns I as packed bits and the statistics, from which the theta step weights ``g`` by ``C``.
    """
    stats = [consistency_statistics(optimizer, w) for w in weights]
    ms, vs = [m for m, _ in stats], [v for _, v in stats]
    pruned = [w.numel - w.active_count() for w in weights]
    # Both top-k's may rank by |g| truncated to bfloat16 (METHOD.md allows a threshold found
    # without sorting): half the histogram passes, still exactly k chosen.
    screened = topk_bits(
        list(grads),
        [int(settings.screen_fraction * p) for p in pruned],
        [(w.mask_bits, False) for w in weights],  # type: ignore[misc]
        magnitude=True,
        key_bits=SELECTION_KEY_BITS,
    )
    eligible = consistency_statistics_(
        list(grads),
        ms,
        vs,
        [w.mask_bits for w in weights],  # type: ignore[misc]
        beta=settings.consistency_beta,
        tau=settings.consistency_tau,
        found_inf=found_inf,
        within=screened,
    )
    selected = topk_bits(
        list(grads),
        [int(settings.alpha * p) for p in pruned],
        [(bits, True) for bits in eligible],
        magnitude=True,
        key_bits=SELECTION_KEY_BITS,
    )
    return selected, (ms, vs)
