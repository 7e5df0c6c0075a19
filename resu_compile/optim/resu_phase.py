"""The RESU phase's optimizer step: theta on the trainable set S, by the selective mode's rules.

Where theta's state lives (memory is the product's promise, so reuse comes first):

- theta-optimizer moments: the user's optimizer's own weight-shaped slots (``exp_avg`` /
  ``momentum_buffer``, ``exp_avg_sq``) on the pruned coordinates, which the sparse invariant keeps
  at zero and nothing else reads while actives are frozen;
- the consistency statistics ``m`` and ``v``: those same slots, which the theta-optimizer's moments
  then give up for buffers of their own;
- with ``freeze_active=False`` the user's optimizer keeps stepping the actives; our masked kernels
  then leave the pruned slots alone (``keep_pruned``), so the sharing above still holds. Only a
  weight whose optimizer takes the re-masking fallback (which zeroes every pruned slot) gives
  theta buffers of its own (``private_slots``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from resu_compile.kernels.consistency import consistency_statistics_
from resu_compile.kernels.segmented_topk import topk_bits
from resu_compile.optim.updates import ThetaAdamW, theta_update, weight_shaped_state

if TYPE_CHECKING:
    from resu_compile.phases import PhaseController
    from resu_compile.state import ManagedWeight

# Names under which torch.optim keeps first / second moments.
FIRST_MOMENT_SLOTS = ("exp_avg", "momentum_buffer")
SECOND_MOMENT_SLOTS = ("exp_avg_sq",)

Slots = tuple[torch.Tensor | None, torch.Tensor | None]


def optimizer_slots(optimizer: torch.optim.Optimizer | None, weight: ManagedWeight) -> Slots:
    """The user's optimizer's first / second moment tensors of ``weight`` (None where absent)."""
    state = optimizer.state.get(weight.param, {}) if optimizer is not None else {}

    def find(names: tuple[str, ...]) -> torch.Tensor | None:
        for name in names:
            value = state.get(name)
            if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                return value
        return None

    return find(FIRST_MOMENT_SLOTS), find(SECOND_MOMENT_SLOTS)


def _buffer(weight: ManagedWeight, key: str) -> torch.Tensor:
    if key not in weight.theta_buffers:
        weight.theta_buffers[key] = torch.zeros_like(weight.param)
    return weight.theta_buffers[key]


class ResuPhaseStep:
    """One controller's theta step (``step``) and the slot bookkeeping commits need."""

    def __init__(self, controller: PhaseController) -> None:
        self._controller = controller
        #: ``id(param)`` of weights whose theta state may not use the optimizer's slots.
        self.private_slots: set[int] = set()

    def _shares_slots(self, weight: ManagedWeight) -> bool:
        return id(weight.param) not in self.private_slots

    def statistics(
        self, optimizer: torch.optim.Optimizer | None, weight: ManagedWeight
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the consistency mode keeps ``m`` and ``v``."""
        shared = self._shares_slots(weight)
        first, second = optimizer_slots(optimizer, weight) if shared else (None, None)
        return (
            first if first is not None else _buffer(weight, "consistency_m"),
            second if second is not None else _buffer(weight, "consistency_v"),
        )

    def theta_moments(
        self, optimizer: torch.optim.Optimizer | None, weight: ManagedWeight
    ) -> Slots:
        """Where theta's optimizer keeps its first / second moments (None if its rule has none)."""
        config = self._controller.config
        rule = config.theta_optimizer
        if rule == "sgd":
            return None, None
        own = self._shares_slots(weight) and config.selection != "consistency"
        first, second = optimizer_slots(optimizer, weight) if own else (None, None)
        first = first if first is not None else _buffer(weight, "exp_avg")
        if rule != "adamw":
            return first, None
        return first, second if second is not None else _buffer(weight, "exp_avg_sq")

    @torch.no_grad()
    def step(
        self,
        optimizer: torch.optim.Optimizer,
        taken: list[tuple[ManagedWeight, torch.Tensor]],
        found_inf: torch.Tensor | None,
    ) -> None:
        """Update theta on S (or, in consistency mode, on this step's subset I, by ``C * g``)."""
        controller = self._controller
        config = controller.config
        first_step = controller.resu_steps == 0
        self._clear_shared_slots(optimizer, taken)
        moments = []
        for weight, grad in taken:
            moment_pair = self.theta_moments(optimizer, weight)
            if config.selection == "topk" and self._reselects(first_step):
                restart = controller.select_by_gradient(weight, grad)
                for moment in moment_pair:
                    if moment is not None:
                        moment.masked_fill_(restart, 0)
            moments.append(moment_pair)
        consistency = None
        if config.selection == "consistency":
            bits, consistency = self._consistent_selection(optimizer, taken, found_inf)
        else:
            bits = [w.select_bits for w, _ in taken]
        theta_update(
            [w.param for w, _ in taken],
            [g for _, g in taken],
            bits,
            [pair[0] for pair in moments],
            [pair[1] for pair in moments],
            consistency,
            rule=config.theta_optimizer,
            lr=config.theta_lr,
            step=controller.resu_steps + 1,
            beta1=config.theta_betas[0],
            beta2=config.theta_betas[1],
            weight_decay=config.theta_weight_decay,
            found_inf=found_inf,
        )

    def rider(
        self, optimizer: torch.optim.Optimizer, taken: list[tuple[ManagedWeight, torch.Tensor]]
    ) -> ThetaAdamW | None:
        """This step's theta update, offered to ride on the actives' masked Adam (one pass over
        every tensor instead of two), or None where it cannot: it must be AdamW on the user's own
        slots, with S fixed for the phase (``random`` or ``all`` selection). The slots are Adam's
        ``exp_avg`` / ``exp_avg_sq`` (:func:`optimizer_slots`), the only update that takes a rider."""
        config = self._controller.config
        if config.theta_optimizer != "adamw" or config.selection not in ("random", "all"):
            return None
        if any(w.select_bits is None or not self._shares_slots(w) for w, _ in taken):
            return None
        self._clear_shared_slots(optimizer, taken)
        return ThetaAdamW(
            [w.select_bits for w, _ in taken],  # type: ignore[misc]
            lr=config.theta_lr,
            step=self._controller.resu_steps + 1,
            beta1=config.theta_betas[0],
            beta2=config.theta_betas[1],
            weight_decay=config.theta_weight_decay,
        )

    def _clear_shared_slots(
        self, optimizer: torch.optim.Optimizer, taken: list[tuple[ManagedWeight, torch.Tensor]]
    ) -> None:
        """At the phase's first step: the shared slots hold 0 on P in sparse phases; make sure
        whatever they held is gone (idempotent, so the rider and the step may both call it)."""
        if self._controller.resu_steps != 0:
            return
        for weight, _ in taken:
            if weight.mask_bits is not None and self._shares_slots(weight):
                pruned = ~weight.mask()
                for slot in optimizer_slots(optimizer, weight):
                    if slot is not None:
                        slot.masked_fill_(pruned, 0)

    def _reselects(self, first_step: bool) -> bool:
        refresh = self._controller.config.refresh
        steps = self._controller.resu_steps
        return first_step or (refresh > 0 and steps % refresh == 0)

    def _consistent_selection(
        self,
        optimizer: torch.optim.Optimizer,
        taken: list[tuple[ManagedWeight, torch.Tensor]],
        found_inf: torch.Tensor | None,
    ) -> tuple[list[torch.Tensor], tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Advance m, v on P and choose this step's subset I of every weight (METHOD.md section 4,
        consistency): ``I = TopK(|g|, k_select)`` within ``TopK(|g|, k_screen) ∩ {C > tau}``.

        Returns I as packed bits and the statistics, from which the theta step weights ``g`` by
        ``C``. All weights at once: one statistics launch and two segmented top-k selections on
        the GPU (:mod:`resu_compile.kernels.consistency`, :func:`topk_bits`).
        """
        config = self._controller.config
        weights = [w for w, _ in taken]
        grads = [g for _, g in taken]
        stats = [self.statistics(optimizer, w) for w in weights]
        ms, vs = [m for m, _ in stats], [v for _, v in stats]
        consistent = consistency_statistics_(
            grads,
            ms,
            vs,
            [w.mask_bits for w in weights],  # type: ignore[misc]
            beta=config.consistency_beta,
            tau=config.consistency_tau,
            found_inf=found_inf,
        )
        pruned = [w.numel - w.active_count() for w in weights]
        screened = topk_bits(
            grads,
            [int(config.screen_fraction * p) for p in pruned],
            [(w.mask_bits, False) for w in weights],  # type: ignore[misc]
            magnitude=True,
        )
        selected = topk_bits(
            grads,
            [int(config.alpha * p) for p in pruned],
            [(s & c, True) for s, c in zip(screened, consistent, strict=True)],
            magnitude=True,
        )
        return selected, (ms, vs)

    @torch.no_grad()
    def restart_state(
        self,
        optimizer: torch.optim.Optimizer | None,
        weight: ManagedWeight,
        resurrected: torch.Tensor,
        carry: bool,
    ) -> None:
        """A resurrected weight's optimizer state: zero, or (``carry``) theta's own moments."""
        first, second = optimizer_slots(optimizer, weight)
        theta = self.theta_moments(optimizer, weight) if carry else (None, None)
        for value in weight_shaped_state(optimizer, weight.param) if optimizer else []:
            source = theta[0] if value is first else theta[1] if value is second else None
            if source is value:
                continue  # theta's moments already live there
            if source is None:
                value.masked_fill_(resurrected, 0)
            else:
                value.copy_(torch.where(resurrected, source, value))
        if not carry:
            for buffer in weight.theta_buffers.values():
                buffer.masked_fill_(resurrected, 0)
