"""The managed optimizer step: the user's optimizer for everything else, our masked updates (and
theta's) for the managed weights, as the runtime's :class:`StepPlan` says.

A step has two halves around the user's ``optimizer.step()``: :meth:`ManagedStep.begin` takes the
managed gradients away from the optimizer (so it leaves those weights alone) and checks them for
NaN / Inf; :meth:`ManagedStep.finish` runs the masked and theta updates and gives the gradients
back. ``step()`` runs both around ``optimizer.step()``; ``attach()`` hooks them onto it instead.
Nothing here knows the schedule: the plan carries what the phase asks for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from resu_compile.kernels.nonfinite import any_nonfinite
from resu_compile.optim.slots import clear_pruned_slots, zero_coordinates
from resu_compile.optim.theta import ThetaSettings, theta_step
from resu_compile.optim.updates import (
    AdamStepCounts,
    ThetaAdamW,
    masked_update,
    preserves_zeros,
    update_rule,
)
from resu_compile.shards import local
from resu_compile.state import ManagedWeight


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step must do for the managed weights (built by the runtime).

    ``theta``: the RESU phase's theta rule (None outside it). ``train_actives``: the actives step
    (False only in a RESU phase with ``freeze_active``). ``graph_masked``: the compiled backward
    already zeroed the pruned gradients (``gradient_mask="graph"`` and the sparse variant served the
    forward of this step). ``freeze_others``: unmanaged parameters skip this step.
    ``agree_nonfinite``: makes the NaN / Inf verdict every rank's (sharded weights: each rank sees
    the gradient of its own shard only, and all must skip a step together).
    """

    weights: Sequence[ManagedWeight]
    theta: ThetaSettings | None
    train_actives: bool
    graph_masked: bool
    mask_in_optimizer: bool
    freeze_others: bool
    raise_on_nonfinite: bool
    agree_nonfinite: Callable[[torch.Tensor], torch.Tensor] | None = None


# How the mask reaches the update of one weight's active coordinates.
NO_MASK = "none"  # no mask yet, or the graph zeroed the gradient and the optimizer keeps zeros
OUR_KERNEL = "kernel"  # our fused masked update replaces the optimizer's step for this weight
REMASK = "remask"  # the optimizer steps a masked gradient, then weight and state are re-masked


@dataclass
class _Step:
    """What :meth:`ManagedStep.begin` leaves for :meth:`ManagedStep.finish`."""

    plan: StepPlan
    skipped: bool = False
    found_inf: torch.Tensor | None = None
    taken: dict[int, tuple[ManagedWeight | None, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )  # id(param) -> (weight or None for an unmanaged param, param, its gradient)
    routes: dict[int, str] = field(default_factory=dict)  # id(weight) -> NO_MASK / ...
    remasked: list[tuple[ManagedWeight, torch.Tensor]] = field(default_factory=list)
    theta_copies: dict[int, torch.Tensor] = field(default_factory=dict)


class ManagedStep:
    """The managed half of every optimizer step of one model (one per controller)."""

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None
        self._hooks: list[Any] = []
        self._groups: dict[int, dict[str, Any]] = {}
        self._validated: tuple[Any, ...] | None = None
        self._step_counts = AdamStepCounts()
        self._nonfinite_host = 0
        self._nonfinite_device: torch.Tensor | None = None
        self._current: _Step | None = None

    # -- skipped steps ----------------------------------------------------------------------

    @property
    def nonfinite_steps(self) -> int:
        """Steps whose managed updates were skipped for NaN / Inf gradients (reading it syncs
        once with the device counter that the default path keeps)."""
        if self._nonfinite_device is not None:
            self._nonfinite_host += int(self._nonfinite_device.item())
            self._nonfinite_device = None
        return self._nonfinite_host

    def forget_step_counts(self) -> None:
        """Adam's step counters may have moved outside a managed step (a pause callback's own
        ``optimizer.step()``, a reloaded optimizer): read them again at the next use."""
        self._step_counts.forget_all()

    def restore_nonfinite_steps(self, count: int) -> None:
        self._nonfinite_device = None
        self._nonfinite_host = count

    def _count_on_device(self, flag: torch.Tensor) -> None:
        if self._nonfinite_device is not None and self._nonfinite_device.device != flag.device:
            self._nonfinite_host = self.nonfinite_steps
        if self._nonfinite_device is None:
            self._nonfinite_device = torch.zeros_like(flag)
        self._nonfinite_device.add_(flag)

    # -- hooking the optimizer ----------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def attach(
        self,
        optimizer: torch.optim.Optimizer,
        before: Callable[[torch.optim.Optimizer], None],
        after: Callable[[torch.optim.Optimizer], None],
    ) -> None:
        """Run ``before`` / ``after`` around every ``optimizer.step()``."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"attach(): optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if self._hooks:
            raise RuntimeError("attach(): an optimizer is already attached; call detach() first")
        self._hooks = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: before(opt)),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: after(opt)),
        ]
        self.optimizer = optimizer

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def validate(self, optimizer: torch.optim.Optimizer, weights: Sequence[ManagedWeight]) -> None:
        """The optimizer must hold every managed weight (checked again when either changes)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"step(): optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        # Which group holds which parameter, by identity: a parameter moved between groups, or
        # groups replaced by ``optimizer.load_state_dict``, gives another key.
        key = (
            id(optimizer),
            len(weights),
            tuple((id(g), tuple(map(id, g["params"]))) for g in optimizer.param_groups),
        )
        if key == self._validated:
            return
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        # A frozen weight (managed because ``include`` names it) is never stepped: it need not be
        # in the optimizer, as under PEFT's usual set-up (an optimizer over the trainable ones).
        missing = [w.name for w in weights if w.param.requires_grad and id(w.param) not in groups]
        if missing:
            raise ValueError(
                f"step(): the optimizer does not hold managed weight(s) {missing}; pass an "
                "optimizer built over model.parameters()"
            )
        self._groups = groups
        self._validated = key
        self.optimizer = optimizer

    # -- the two halves -----------------------------------------------------------------------

    def begin(self, optimizer: torch.optim.Optimizer, plan: StepPlan) -> None:
        """Before ``optimizer.step()``: route every managed weight, check for NaN / Inf, and take
        the gradients the optimizer must not apply."""
        current = self._current = _Step(plan)
        weights = [w for w in plan.weights if w.param.grad is not None]
        in_resu = plan.theta is not None
        if plan.train_actives:
            rules = {id(g): update_rule(optimizer, g) for g in optimizer.param_groups}
            current.routes = {id(w): self._route(optimizer, w, plan, rules) for w in weights}
        routes = current.routes.values()
        # Only steps whose managed updates run through our own code look for NaN/Inf. Our
        # kernels take the verdict as a device flag (like torch's fused optimizers' found_inf),
        # so the check costs no host sync; the "raise" policy and the re-masking route (the
        # user's optimizer stepping managed weights) need the answer on the host. With the
        # gradient masked in the graph, pruned slots never see a NaN and actives are the user's
        # optimizer's business, exactly as in dense training.
        ours = in_resu or any(r != NO_MASK for r in routes)
        if weights and (plan.raise_on_nonfinite or REMASK in routes):
            current.skipped = bool(_nonfinite_flag(weights, plan).item())
        elif weights and ours:
            current.found_inf = _nonfinite_flag(weights, plan)
            self._count_on_device(current.found_inf)
        if current.skipped:
            self._nonfinite_host += 1
            if plan.raise_on_nonfinite:
                self._current = None
                raise FloatingPointError(
                    "step(): a managed weight's gradient holds NaN or Inf (nan_policy='raise')"
                )
            for weight in weights:
                self._take(current, weight, weight.param)
            return
        for weight in weights:
            route = current.routes.get(id(weight), NO_MASK)
            # A weight first used after the RESU entry (a data-dependent branch) has no mask nor
            # selection: it trains dense, through the optimizer, until the next prune or commit.
            with_theta = in_resu and weight.select_bits is not None
            # With trainable actives, a weight whose optimizer re-masks would lose its theta:
            # keep a copy, and its theta state in buffers of its own.
            weight.theta_private = with_theta and route == REMASK
            if weight.theta_private:
                current.theta_copies[id(weight)] = weight.param.detach().clone()
            if with_theta or route == OUR_KERNEL:
                self._take(current, weight, weight.param)
            elif route == REMASK:
                # The optimizer steps a masked copy; .grad gets the full G back after the step
                # (RigL's grow step and the gradient amnesty score read it).
                grad = weight.param.grad
                current.remasked.append((weight, grad))
                weight.param.grad = grad.masked_fill(~weight.mask(), 0)
        # The optimizer steps every weight not taken, and advances its Adam step counter.
        self._step_counts.forget([w.param for w in weights if id(w.param) not in current.taken])
        if in_resu and plan.freeze_others:
            managed = {id(w.param) for w in plan.weights}
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) not in managed and param.grad is not None:
                        self._take(current, None, param)

    def finish(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``optimizer.step()``: the managed updates, then every gradient goes back."""
        current, self._current = self._current, None
        if current is None:
            return
        try:
            if not current.skipped:
                with torch.no_grad():
                    self._update(optimizer, current)
        finally:
            for _, param, grad in current.taken.values():
                param.grad = grad
            for weight, grad in current.remasked:
                weight.param.grad = grad

    # -- internals ------------------------------------------------------------------------------

    def _route(
        self,
        optimizer: torch.optim.Optimizer,
        weight: ManagedWeight,
        plan: StepPlan,
        rules: dict[int, str | None],
    ) -> str:
        """How the mask reaches this weight's update (``rules``: :func:`update_rule` per group).
        In the RESU phase the gradient is never masked in the graph."""
        if weight.mask_bits is None:
            return NO_MASK
        in_resu = plan.theta is not None
        if not in_resu and plan.graph_masked and weight.graph_masked and preserves_zeros(optimizer):
            return NO_MASK
        if (in_resu or plan.mask_in_optimizer) and rules[id(self._groups[id(weight.param)])]:
            return OUR_KERNEL
        return REMASK

    @staticmethod
    def _take(current: _Step, weight: ManagedWeight | None, param: torch.Tensor) -> None:
        current.taken[id(param)] = (weight, param, param.grad)
        param.grad = None

    def _update(self, optimizer: torch.optim.Optimizer, current: _Step) -> None:
        plan = current.plan
        taken = [(w, g) for w, _, g in current.taken.values() if w is not None]
        ours = [(w, g) for w, g in taken if current.routes.get(id(w)) == OUR_KERNEL]
        remasked = [w for w, _ in current.remasked]
        theta = plan.theta
        if theta is None:
            self._masked_update(optimizer, ours, current.found_inf, keep_pruned=False)
            self._remask(optimizer, remasked)
            return
        if theta.step == 1:
            clear_pruned_slots(optimizer, [w for w, _ in taken])
        rated = self._theta_by_rate(theta, taken)
        if plan.train_actives:  # actives step as in a sparse phase; theta's slots are kept
            same_pass = None
            if not remasked and len(ours) == len(taken) and len(rated) == 1:
                same_pass = rated[0][0].same_pass([w for w, _ in ours])
            if self._masked_update(optimizer, ours, current.found_inf, True, same_pass):
                return  # theta stepped in the same pass
            self._remask(optimizer, remasked)
            for weight in remasked:
                values = current.theta_copies[id(weight)]
                weight.param.copy_(torch.where(weight.mask(), weight.param, values))
        for settings, members in rated:
            weights, grads = [w for w, _ in members], [g for _, g in members]
            theta_step(optimizer, weights, grads, settings, current.found_inf)

    def _theta_by_rate(
        self, theta: ThetaSettings, taken: list[tuple[ManagedWeight, torch.Tensor]]
    ) -> list[tuple[ThetaSettings, list[tuple[ManagedWeight, torch.Tensor]]]]:
        """The weights (with their gradients) that share one theta rate, with its settings: one
        set, unless theta follows the schedules of param groups that are at different points."""
        per_group: dict[int, ThetaSettings] = {}
        rated: dict[float, tuple[ThetaSettings, list[tuple[ManagedWeight, torch.Tensor]]]] = {}
        for weight, grad in taken:
            group = self._groups[id(weight.param)]
            settings = per_group.get(id(group))
            if settings is None:
                settings = per_group[id(group)] = theta.for_group(group)
            rated.setdefault(settings.lr, (settings, []))[1].append((weight, grad))
        return list(rated.values())

    def _masked_update(
        self,
        optimizer: torch.optim.Optimizer,
        taken: list[tuple[ManagedWeight, torch.Tensor]],
        found_inf: torch.Tensor | None,
        keep_pruned: bool,
        same_pass: ThetaAdamW | None = None,
    ) -> bool:
        """One batched masked update per param group (``keep_pruned``: the RESU phase leaves theta
        and its moments alone); with ``same_pass`` (theta's AdamW), returns whether theta's step
        ran in the same launch in every group (else none of it ran)."""
        by_group: dict[int, list[tuple[ManagedWeight, torch.Tensor]]] = {}
        for weight, grad in taken:
            by_group.setdefault(id(self._groups[id(weight.param)]), []).append((weight, grad))
        if same_pass is not None and len(by_group) != 1:
            same_pass = None  # all or nothing: theta's step is one rule across groups
        ran_theta = False
        for members in by_group.values():
            ran_theta = masked_update(
                optimizer,
                self._groups[id(members[0][0].param)],
                [w.param for w, _ in members],
                [g for _, g in members],
                [w.mask_bits for w, _ in members],
                self._step_counts,
                found_inf,
                keep_pruned=keep_pruned,
                theta=same_pass,
            )
        return ran_theta

    @staticmethod
    def _remask(optimizer: torch.optim.Optimizer, weights: list[ManagedWeight]) -> None:
        for weight in weights:
            zero_coordinates(optimizer, weight.param, ~weight.mask())


def _nonfinite_flag(weights: list[ManagedWeight], plan: StepPlan) -> torch.Tensor:
    """A 1-element float32 device tensor: 1 if any managed gradient holds NaN or Inf (one
    launch per dtype on the GPU; nothing waits for it, unless ranks must agree)."""
    flag = any_nonfinite([local(w.param.grad) for w in weights])  # type: ignore[arg-type]
    return flag if plan.agree_nonfinite is None else plan.agree_nonfinite(flag)
