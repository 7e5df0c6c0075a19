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

from resu_compile.optim.updates import (
    HostSteps,
    masked_update,
    preserves_zeros,
    theta_update,
    update_rule,
    weight_shaped_state,
)

if TYPE_CHECKING:
    from resu_compile.phases import PhaseController
    from resu_compile.state import ManagedWeight

# Names under which torch.optim keeps first / second moments; the RESU phase stores theta's own
# moments in their pruned slots, which the sparse invariant keeps at zero and otherwise unused.
_FIRST_MOMENT_SLOTS = ("exp_avg", "momentum_buffer")
_SECOND_MOMENT_SLOTS = ("exp_avg_sq",)


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
        self._host_steps = HostSteps()

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
        plans = {} if in_resu else {id(w): self._sparse_plan(optimizer, w) for w in weights}
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
        for weight in weights:
            plan = "kernel" if in_resu else plans[id(weight)]
            if plan == "kernel":
                self._take_grad(weight.param)
            elif plan == "fallback":
                weight.param.grad.masked_fill_(~weight.mask(), 0)
                self._fallback.append(weight)
        if in_resu and controller.config.freeze_others:
            managed = {id(w.param) for w in controller.state}
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) not in managed and param.grad is not None:
                        self._take_grad(param)

    def _sparse_plan(self, optimizer: torch.optim.Optimizer, weight: ManagedWeight) -> str | None:
        """How the mask reaches this weight's update in a sparse phase.

        - None: nothing to do (no mask yet, or the compiled backward already zeroed the pruned
          gradient and the optimizer keeps zeros at zero by itself);
        - "kernel": our fused masked update replaces the optimizer's step for this weight;
        - "fallback": mask the gradient now, let the optimizer step, re-mask weight and state.
        """
        if weight.mask_bits is None:
            return None
        config = self._controller.config
        if config.gradient_mask == "graph" and weight.graph_masked and preserves_zeros(optimizer):
            return None
        if config.gradient_mask == "optimizer" and update_rule(
            optimizer, self._groups[id(weight.param)]
        ):
            return "kernel"
        return "fallback"

    def _after(self, optimizer: torch.optim.Optimizer) -> None:
        controller = self._controller
        stash, self._stash = self._stash, {}
        try:
            if not self._skip_managed:
                with torch.no_grad():
                    self._update_managed(optimizer, stash)
        finally:
            for param, grad in stash.values():
                param.grad = grad
        controller.after_step()

    def _update_managed(
        self, optimizer: torch.optim.Optimizer, stash: dict[int, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        taken = [(w, stash[id(w.param)][1]) for w in self._controller.state if id(w.param) in stash]
        if self._controller.phase.value == "resu":
            self._theta_step(optimizer, taken)
        else:  # the "kernel" plan: one batched masked update per param group
            by_group: dict[int, list[tuple[ManagedWeight, torch.Tensor]]] = {}
            for weight, grad in taken:
                by_group.setdefault(id(self._groups[id(weight.param)]), []).append((weight, grad))
            for members in by_group.values():
                masked_update(
                    optimizer,
                    self._groups[id(members[0][0].param)],
                    [w.param for w, _ in members],
                    [g for _, g in members],
                    [w.mask_bits for w, _ in members],
                    self._host_steps,
                    self._found_inf,
                )
        for weight in self._fallback:
            self.zero_coordinates(optimizer, weight.param, ~weight.mask())

    def _theta_step(
        self, optimizer: torch.optim.Optimizer, taken: list[tuple[ManagedWeight, torch.Tensor]]
    ) -> None:
        config = self._controller.config
        slots = [self._theta_slots(optimizer, weight) for weight, _ in taken]
        if self._controller.resu_steps == 0:
            # Theta's moments start at zero on every pruned slot, whatever the slot held.
            for (weight, _), pair in zip(taken, slots, strict=True):
                if weight.mask_bits is not None:
                    pruned = ~weight.mask()
                    for slot in pair:
                        if slot is not None:
                            slot.masked_fill_(pruned, 0)
        theta_update(
            [w.param for w, _ in taken],
            [g for _, g in taken],
            [w.select_bits for w, _ in taken],
            [pair[0] for pair in slots],
            [pair[1] for pair in slots],
            rule=config.theta_optimizer,
            lr=config.theta_lr,
            step=self._controller.resu_steps + 1,
            beta1=config.theta_betas[0],
            beta2=config.theta_betas[1],
            weight_decay=config.theta_weight_decay,
            found_inf=self._found_inf,
        )

    def _theta_slots(
        self, optimizer: torch.optim.Optimizer, weight: ManagedWeight
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Tensors for theta's moments: the optimizer's own pruned slots when it has them."""
        rule = self._controller.config.theta_optimizer
        if rule == "sgd":
            return None, None
        state = optimizer.state.get(weight.param, {})

        def slot(names: tuple[str, ...], key: str) -> torch.Tensor:
            for name in names:
                value = state.get(name)
                if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                    return value
            if key not in weight.theta_buffers:
                weight.theta_buffers[key] = torch.zeros_like(weight.param)
            return weight.theta_buffers[key]

        first = slot(_FIRST_MOMENT_SLOTS, "exp_avg")
        second = slot(_SECOND_MOMENT_SLOTS, "exp_avg_sq") if rule == "adamw" else None
        return first, second

    def _take_grad(self, param: torch.Tensor) -> None:
        self._stash[id(param)] = (param, param.grad)
        param.grad = None

    @staticmethod
    def _nonfinite_flag(weights: list[ManagedWeight]) -> torch.Tensor:
        """A 1-element float32 device tensor: 1 if any managed gradient holds NaN or Inf."""
        # One fused reduction for all weights; nothing waits for it.
        norms = torch._foreach_norm([w.param.grad for w in weights], float("inf"))
        device = norms[0].device
        finite = torch.stack([n.to(device) for n in norms]).isfinite().all()
        return (~finite).to(torch.float32).reshape(1)

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
    def zero_coordinates(
        optimizer: torch.optim.Optimizer | None, param: torch.Tensor, where: torch.Tensor
    ) -> None:
        """``param`` and every optimizer state tensor shaped like it become 0 where ``where``."""
        param.data.masked_fill_(where, 0)
        if optimizer is not None:
            for value in weight_shaped_state(optimizer, param):
                value.masked_fill_(where, 0)

    @staticmethod
    def zero_state(
        optimizer: torch.optim.Optimizer | None, weight: ManagedWeight, where: torch.Tensor
    ) -> None:
        """Optimizer state (the user's and theta's own buffers) becomes 0 where ``where``."""
        tensors = list(weight.theta_buffers.values())
        if optimizer is not None:
            tensors += weight_shaped_state(optimizer, weight.param)
        for value in tensors:
            value.masked_fill_(where, 0)
