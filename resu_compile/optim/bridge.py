"""OptimizerBridge: how one optimizer step becomes a masked, phase-aware step.

The user's loop changes by one line at most: ``model.resu.step(optimizer)`` instead of
``optimizer.step()``, or ``model.resu.attach(optimizer)`` once, after which ``optimizer.step()``
itself is hooked (this also works under ``GradScaler.step``).

Around the optimizer's own step, the bridge takes the gradients of the weights it updates itself
away from the optimizer (a parameter whose ``.grad`` is None is skipped by every torch.optim
optimizer), lets the optimizer step the rest, then runs the masked or RESU updates and gives the
gradients back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from resu_compile.kernels.masked_zero import zero_where_clear_
from resu_compile.kernels.nonfinite import any_nonfinite
from resu_compile.optim.resu_phase import ResuPhaseStep
from resu_compile.optim.updates import (
    AdamStepCounts,
    ThetaAdamW,
    masked_update,
    preserves_zeros,
    update_rule,
    weight_shaped_state,
)

if TYPE_CHECKING:
    from resu_compile.phases import PhaseController
    from resu_compile.state import ManagedWeight


class OptimizerBridge:
    """Runs the phase-aware optimizer step for one controller."""

    def __init__(self, controller: PhaseController) -> None:
        self._controller = controller
        self._optimizer: torch.optim.Optimizer | None = None
        self._hooks: list[Any] = []
        self._stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._groups: dict[int, dict[str, Any]] = {}
        self._validated: tuple[int, int, int] | None = None
        self._skip_managed = False
        self._fallback: list[ManagedWeight] = []
        self._found_inf: torch.Tensor | None = None
        self._nonfinite_count: torch.Tensor | None = None
        self._nonfinite_carry = 0
        self._host_steps = AdamStepCounts()
        self._masked_grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._plans: dict[int, str | None] = {}
        self._theta_copies: dict[int, torch.Tensor] = {}
        #: The RESU phase's theta step, and the slot bookkeeping commits need from it.
        self.resu_phase = ResuPhaseStep(controller)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer

    # -- entry points -----------------------------------------------------------------------

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._hooks and optimizer is self._optimizer:
            raise RuntimeError(
                "step(): this optimizer is attached; call optimizer.step() instead of resu.step()"
            )
        self._before(optimizer)
        try:
            optimizer.step()
        finally:
            self._after(optimizer)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"attach(): optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if self._hooks:
            raise RuntimeError("attach(): an optimizer is already attached; call detach() first")
        self._validate(optimizer)
        self._hooks = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before(opt)),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after(opt)),
        ]
        self._optimizer = optimizer

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- the step ---------------------------------------------------------------------------

    def _validate(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"step(): optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        weights = list(self._controller.state)
        if not weights:
            raise ValueError(
                "step(): no managed weight found (the model must run a forward pass first, and "
                f"at least one weight must qualify):\n{self._controller.report()}"
            )
        key = (id(optimizer), len(weights), sum(len(g["params"]) for g in optimizer.param_groups))
        if key == self._validated:
            return
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        missing = [w.name for w in weights if id(w.param) not in groups]
        if missing:
            raise ValueError(
                f"step(): the optimizer does not hold managed weight(s) {missing}; pass an "
                "optimizer built over model.parameters()"
            )
        self._groups = groups
        self._validated = key

    def _before(self, optimizer: torch.optim.Optimizer) -> None:
        self._validate(optimizer)
        self._optimizer = optimizer
        controller = self._controller
        controller.advance()
        weights = [w for w in controller.state if w.param.grad is not None]
        in_resu = controller.phase.value == "resu"
        trains_actives = not in_resu or not controller.config.freeze_active
        rules = {id(g): update_rule(optimizer, g) for g in optimizer.param_groups}
        self._plans = (
            {id(w): self._active_plan(optimizer, w, in_resu, rules) for w in weights}
            if trains_actives
            else {}
        )
        plans = self._plans
        self._fallback = []
        self._found_inf = None
        # Only steps whose managed updates run through our own code look for NaN/Inf. Our
        # kernels take the verdict as a device flag (like torch's fused optimizers' found_inf),
        # so the check costs no host sync; the "raise" policy and the fallback (the user's
        # optimizer stepping managed weights) need the answer on the host. With the gradient
        # masked in the graph, pruned slots never see a NaN and actives are the user's
        # optimizer's business, exactly as in dense training.
        ours = in_resu or any(plans.values())
        host_check = controller.config.nan_policy == "raise" or "fallback" in plans.values()
        if weights and host_check:
            self._skip_managed = bool(self._nonfinite_flag(weights).item())
        else:
            self._skip_managed = False
            if weights and ours:
                self._found_inf = self._nonfinite_flag(weights)
                self._count_nonfinite(self._found_inf)
        if self._skip_managed:
            controller.nonfinite_steps += 1
            if controller.config.nan_policy == "raise":
                raise FloatingPointError(
                    "step(): a managed weight's gradient holds NaN or Inf (nan_policy='raise')"
                )
            for weight in weights:
                self._take_grad(weight.param)
            return
        # With trainable actives, a weight whose optimizer re-masks (the fallback) would lose its
        # theta: keep a copy, and its theta state in buffers of its own.
        self._theta_copies = {
            id(w.param): w.param.detach().clone()
            for w in weights
            if in_resu and plans.get(id(w)) == "fallback"
        }
        self.resu_phase.private_slots = set(self._theta_copies)
        for weight in weights:
            plan = plans.get(id(weight))
            grad = weight.param.grad
            if in_resu or plan == "kernel":
                self._take_grad(weight.param)
            if plan == "fallback":
                # The optimizer steps a masked copy; .grad gets the full G back after the step
                # (RigL's grow step and the gradient amnesty score read it).
                self._masked_grads.append((weight.param, grad))
                weight.param.grad = grad.masked_fill(~weight.mask(), 0)
                self._fallback.append(weight)
        if in_resu and controller.config.freeze_others:
            managed = {id(w.param) for w in controller.state}
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) not in managed and param.grad is not None:
                        self._take_grad(param)

    def _active_plan(
        self,
        optimizer: torch.optim.Optimizer,
        weight: ManagedWeight,
        in_resu: bool,
        rules: dict[int, str | None],
    ) -> str | None:
        """How the mask reaches the update of this weight's active coordinates.

        - None: nothing to do (no mask yet, or the compiled backward already zeroed the pruned
          gradient and the optimizer keeps zeros at zero by itself);
        - "kernel": our fused masked update replaces the optimizer's step for this weight;
        - "fallback": the optimizer steps a masked gradient, then weight and state are re-masked.

        In the RESU phase (``freeze_active=False``) the gradient is never masked in the graph.
        ``rules``: :func:`update_rule` of each param group, by ``id``.
        """
        if weight.mask_bits is None:
            return None
        controller = self._controller
        config = controller.config
        if (
            not in_resu
            and config.gradient_mask == "graph"
            and weight.graph_masked
            and controller.served_variant == "sparse"
            and preserves_zeros(optimizer)
        ):
            return None
        if (in_resu or config.gradient_mask == "optimizer") and rules[
            id(self._groups[id(weight.param)])
        ]:
            return "kernel"
        return "fallback"

    def _after(self, optimizer: torch.optim.Optimizer) -> None:
        controller = self._controller
        stash, self._stash = self._stash, {}
        masked, self._masked_grads = self._masked_grads, []
        try:
            if not self._skip_managed:
                with torch.no_grad():
                    self._update_managed(optimizer, stash)
        finally:
            for param, grad in [*stash.values(), *masked]:
                param.grad = grad
        # The next step trusts a graph mask only if a compiled forward serves it again (an eager
        # forward of the original module, e.g. in a pause callback, masks nothing).
        controller.served_variant = None
        controller.after_step()

    def _update_managed(
        self, optimizer: torch.optim.Optimizer, stash: dict[int, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        taken = [(w, stash[id(w.param)][1]) for w in self._controller.state if id(w.param) in stash]
        kernel = [(w, g) for w, g in taken if self._plans.get(id(w)) == "kernel"]
        if self._controller.phase.value != "resu":
            self._masked_update(optimizer, kernel)
            self._remask_fallback(optimizer)
            return
        if self._plans:  # freeze_active=False: actives step as in a sparse phase, theta kept
            rider = None
            if not self._fallback and len(kernel) == len(taken):
                rider = self.resu_phase.rider(optimizer, taken)
            if self._masked_update(optimizer, kernel, keep_pruned=True, theta=rider):
                return  # theta stepped in the same pass
            self._remask_fallback(optimizer)
            for weight in self._fallback:
                values = self._theta_copies[id(weight.param)]
                weight.param.copy_(torch.where(weight.mask(), weight.param, values))
        self.resu_phase.step(optimizer, taken, self._found_inf)

    def _masked_update(
        self,
        optimizer: torch.optim.Optimizer,
        taken: list[tuple[ManagedWeight, torch.Tensor]],
        keep_pruned: bool = False,
        theta: ThetaAdamW | None = None,
    ) -> bool:
        """One batched masked update per param group (the "kernel" plan); with ``theta``, returns
        whether theta's step rode along in every group (else none of it ran)."""
        by_group: dict[int, list[tuple[ManagedWeight, torch.Tensor]]] = {}
        for weight, grad in taken:
            by_group.setdefault(id(self._groups[id(weight.param)]), []).append((weight, grad))
        if theta is not None and len(by_group) != 1:
            theta = None  # all or nothing: theta's step is one rule across groups
        rode = False
        for members in by_group.values():
            rode = masked_update(
                optimizer,
                self._groups[id(members[0][0].param)],
                [w.param for w, _ in members],
                [g for _, g in members],
                [w.mask_bits for w, _ in members],
                self._host_steps,
                self._found_inf,
                keep_pruned,
                theta,
            )
        return rode

    def _remask_fallback(self, optimizer: torch.optim.Optimizer) -> None:
        for weight in self._fallback:
            self.zero_coordinates(optimizer, weight.param, ~weight.mask())

    def _take_grad(self, param: torch.Tensor) -> None:
        self._stash[id(param)] = (param, param.grad)
        param.grad = None

    @staticmethod
    def _nonfinite_flag(weights: list[ManagedWeight]) -> torch.Tensor:
        """A 1-element float32 device tensor: 1 if any managed gradient holds NaN or Inf (one
        launch per dtype on the GPU; nothing waits for it)."""
        return any_nonfinite([w.param.grad for w in weights])  # type: ignore[misc]

    def _count_nonfinite(self, flag: torch.Tensor) -> None:
        """Accumulate device flags in one device counter (read only when someone asks)."""
        if self._nonfinite_count is None or self._nonfinite_count.device != flag.device:
            self._nonfinite_carry += self.pending_nonfinite()
            self._nonfinite_count = torch.zeros_like(flag)
        self._nonfinite_count.add_(flag)

    def pending_nonfinite(self) -> int:
        """Skipped steps flagged on the device since the last call (reading them syncs once)."""
        carry, self._nonfinite_carry = self._nonfinite_carry, 0
        if self._nonfinite_count is None:
            return carry
        count, self._nonfinite_count = self._nonfinite_count, None
        return carry + int(count.item())

    # -- transitions' helpers -----------------------------------------------------------------

    @staticmethod
    def zero_where_pruned(
        optimizer: torch.optim.Optimizer | None,
        weights: list[ManagedWeight],
        state_bits: list[torch.Tensor] | None = None,
    ) -> None:
        """Every weight, and every optimizer state tensor shaped like it, becomes 0 where its mask
        bit is clear (the states: where their ``state_bits[i]`` bit is clear, when given). One
        Triton launch per dtype on the GPU (:func:`zero_where_clear_`)."""
        tensors, bits = [], []
        for i, weight in enumerate(weights):
            if weight.mask_bits is None:
                continue
            tensors.append(weight.param.data)
            bits.append(weight.mask_bits)
            for value in weight_shaped_state(optimizer, weight.param) if optimizer else []:
                tensors.append(value)
                bits.append(weight.mask_bits if state_bits is None else state_bits[i])
        zero_where_clear_(tensors, bits)

    @staticmethod
    def zero_coordinates(
        optimizer: torch.optim.Optimizer | None, param: torch.Tensor, where: torch.Tensor
    ) -> None:
        """``param`` and every optimizer state tensor shaped like it become 0 where ``where``."""
        param.data.masked_fill_(where, 0)
        if optimizer is not None:
            for value in weight_shaped_state(optimizer, param):
                value.masked_fill_(where, 0)
