"""Phase and PhaseController: the RESU schedule, its transitions and the optimizer step.

The controller is the ``.resu`` handle users hold. It counts optimizer steps, runs the transitions
of METHOD.md (prune, RESU entry, commit) between steps, eagerly and in place, and tells the
compiled graphs which variant to run. Graph code never reads a phase flag, so switching phases
never recompiles.
"""

from __future__ import annotations

import contextlib
import enum
import weakref
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from resu_compile.config import ResuConfig
from resu_compile.method.rigl import rigl_fraction
from resu_compile.method.schedule import amnesty_budget, cycle_sparsities
from resu_compile.optim.bridge import OptimizerBridge
from resu_compile.report import render_report
from resu_compile.state import ManagedWeight, StateManager
from resu_compile.telemetry import render_history
from resu_compile.transitions import (
    TransitionContext,
    commit_weights,
    enter_resu_weights,
    input_norms,
    prune_weights,
    regrow_weights,
    reselect_by_gradient,
)

STATE_FORMAT = 2

# Options that change what a checkpoint's masks and theta mean: loading across them is refused.
_METHOD_OPTIONS = (
    "method",
    "sparsity",
    "cycles",
    "schedule",
    "criterion",
    "distribution",
    "pattern",
    "selection",
    "alpha",
    "refresh",
    "screen_fraction",
    "consistency_tau",
    "consistency_beta",
    "freeze_active",
    "theta_optimizer",
    "amnesty",
    "amnesty_score",
    "r_start",
    "r_end",
    "carry_theta_state",
    "rigl_interval",
    "rigl_fraction",
    "rigl_end",
    "pause_after",
)


class Phase(str, enum.Enum):
    """Steady phases between transitions. PRUNE and COMMIT are instants, not phases.

    PAUSED: after a cycle listed in ``pause_after``, until ``resume()``; steps taken meanwhile
    (e.g. a reinforcement-learning stage) keep the masks but do not move the schedule.
    """

    TRAIN = "train"
    STABILIZE = "stabilize"
    RESU = "resu"
    PAUSED = "paused"
    DONE = "done"


class PhaseController:
    """Drives one compiled model through the RESU schedule (the ``model.resu`` handle)."""

    def __init__(
        self,
        config: ResuConfig,
        param_names: dict[int, str] | None = None,
        module: torch.nn.Module | None = None,
    ) -> None:
        self.config = config
        self._module = weakref.ref(module) if module is not None else None
        self.state = StateManager()
        self._param_names = param_names or {}
        self._sparsities = cycle_sparsities(config.sparsity, config.cycles, config.schedule)
        self.phase = Phase.TRAIN
        self.cycle = 0
        self.step_count = 0
        self.resu_steps = 0
        self.paused_steps = 0
        self.target_sparsity = 0.0
        self._nonfinite_steps = 0
        self.history: list[dict[str, Any]] = []
        self._calibrating = False
        self._pruned = False
        self.served_variant: str | None = None
        self._bridge = OptimizerBridge(self)

    # -- what the compiled graphs ask -------------------------------------------------------

    @property
    def calibrating(self) -> bool:
        return self._calibrating

    def graph_variant(self) -> str:
        """The graph variant the current phase runs (see ``backend.VARIANTS``).

        The answer is remembered in ``served_variant``: the optimizer step trusts the graph to
        have masked the gradient only if the forward really ran the sparse variant (a prune
        between that forward and the step, e.g. RigL's initial one, leaves it unmasked).
        """
        if self._calibrating:
            variant = "calibrate"
        elif (
            self.phase is not Phase.RESU
            and self.config.gradient_mask == "graph"
            and self.pruned
            and not self.needs_dense_gradient()
        ):
            variant = "sparse"
        else:
            variant = "dense"
        self.served_variant = variant
        return variant

    def needs_dense_gradient(self) -> bool:
        """Whether the step in progress must see ``G`` on pruned coordinates too (RigL's grow
        step after it reads it), so the graph may not mask the gradient."""
        return self._rigl_updates_after(self.step_count + 1)

    @property
    def pruned(self) -> bool:
        """Whether masks exist (from the first prune on)."""
        return self._pruned

    def name_of(self, param: torch.Tensor, fallback: str) -> str:
        return self._param_names.get(id(param), fallback)

    @contextlib.contextmanager
    def calibrate(self) -> Iterator[None]:
        """Forward passes inside this block record each managed weight's input-column norms."""
        if self._calibrating:
            raise RuntimeError("calibrate(): already calibrating")
        self._calibrating = True
        try:
            yield
        finally:
            self._calibrating = False

    def input_norms(self, name: str) -> torch.Tensor:
        """``||X_j||_2`` per input feature of managed weight ``name``, from calibrate passes."""
        return input_norms(self.state.by_name(name), "input_norms()")

    # -- the user's loop --------------------------------------------------------------------

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Replaces ``optimizer.step()``: masked / RESU updates, then the schedule advances."""
        self._bridge.step(optimizer)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook ``optimizer`` so that a plain ``optimizer.step()`` does what :meth:`step` does."""
        self._bridge.attach(optimizer)

    def detach(self) -> None:
        self._bridge.detach()

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._bridge.optimizer

    def after_step(self) -> None:
        """Called by the bridge once per optimizer step."""
        if self.phase is Phase.PAUSED:
            self.paused_steps += 1
            return
        self.step_count += 1
        if self.phase is Phase.RESU:
            self.resu_steps += 1
        self.advance(after_step=True)

    @property
    def nonfinite_steps(self) -> int:
        """Steps whose managed updates were skipped for NaN / Inf gradients."""
        self._nonfinite_steps += self._bridge.pending_nonfinite()
        return self._nonfinite_steps

    @nonfinite_steps.setter
    def nonfinite_steps(self, value: int) -> None:
        self._bridge.pending_nonfinite()
        self._nonfinite_steps = value

    # -- schedule ---------------------------------------------------------------------------

    def current_target(self) -> float:
        """Target sparsity of the current cycle (the final target once the schedule is done)."""
        return self._sparsities[min(self.cycle, self.config.cycles - 1)]

    def advance(self, *, after_step: bool = False) -> None:
        """Run every transition the step count has reached (automatic schedule only).

        ``after_step``: called right after an optimizer step, when the gradients of that step are
        still in ``.grad`` (RigL's mask updates read them, so they run only then).
        """
        if self.config.manual:
            return
        if after_step and self._rigl_updates_after(self.step_count):
            self._rigl_update()
        while (transition := self._due_transition()) is not None:
            transition()

    def _due_transition(self) -> Callable[[], None] | None:
        """The transition the schedule has reached, if any (METHOD.md section 2, or a baseline's)."""
        if self.phase in (Phase.DONE, Phase.PAUSED):
            return None
        config = self.config
        length = config.cycle_length
        train, stabilize, _ = config.phase_steps
        into_cycle = self.step_count - self.cycle * length
        if config.method == "rigl" and not self._pruned:
            return self._rigl_init
        if self.phase is Phase.TRAIN and into_cycle >= train and self._prunes_in_cycle():
            target = config.sparsity if config.method == "oneshot" else self.current_target()
            return lambda: self._prune(target)
        if config.method != "resu":
            return self._end_cycle if into_cycle >= length else None
        if self.phase is Phase.STABILIZE and into_cycle >= train + stabilize:
            return self._enter_resu
        if self.phase is Phase.RESU and into_cycle >= length:
            return self._commit
        return None

    def _prunes_in_cycle(self) -> bool:
        method = self.config.method
        return method in ("resu", "gmp") or (method == "oneshot" and self.cycle == 0)

    def _end_cycle(self) -> None:
        """Close the current cycle; pause after it if the user asked for a pause there."""
        finished = self.cycle
        self.cycle += 1
        self.phase = self._phase_after_cycle()
        if finished in self.config.pause_after:
            self.phase = Phase.PAUSED
            self._record("pause", cycle=finished)
            if self.config.on_pause is not None:
                module = self._module() if self._module is not None else None
                with torch.enable_grad():  # transitions run under no_grad; the stage may train
                    self.config.on_pause(module, finished)
                self.resume()

    def _phase_after_cycle(self) -> Phase:
        return Phase.DONE if self.cycle >= self.config.cycles else Phase.TRAIN

    def resume(self) -> None:
        """Continue the schedule after a pause (called for you when ``on_pause`` returns)."""
        if self.phase is not Phase.PAUSED:
            raise RuntimeError(
                f"resume(): the schedule is not paused (phase is {self.phase.value})"
            )
        self.phase = self._phase_after_cycle()

    # -- manual phase control ---------------------------------------------------------------

    def prune(self, sparsity: float | None = None) -> None:
        """Prune every managed weight to ``sparsity`` (default: this cycle's target)."""
        self._require_manual("prune")
        if self.phase is Phase.RESU:
            raise RuntimeError("prune(): the RESU phase is running; call commit() first")
        target = self.current_target() if sparsity is None else sparsity
        if not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
            raise ValueError(f"prune(): sparsity must be a number in [0, 1), got {target!r}")
        if self.config.nm is not None and target != self.config.sparsity:
            raise ValueError(
                f"prune(): sparsity must be {self.config.sparsity} with pattern "
                f"{self.config.pattern!r}, got {target!r}"
            )
        self._require_managed("prune")
        self._prune(float(target))

    def enter_resu(self) -> None:
        """Start the RESU phase: theta on the selected pruned coordinates, actives frozen."""
        self._require_manual("enter_resu")
        if self.phase is Phase.RESU:
            raise RuntimeError("enter_resu(): the RESU phase is already running")
        if not self._pruned:
            raise RuntimeError("enter_resu(): nothing is pruned yet; call prune() first")
        self._enter_resu()

    def commit(self) -> None:
        """End the RESU phase with the amnesty tournament (or a merge if amnesty is off)."""
        self._require_manual("commit")
        if self.phase is not Phase.RESU:
            raise RuntimeError(
                f"commit(): only valid in the RESU phase (phase is {self.phase.value})"
            )
        self._commit()

    def set_phase(self, phase: Phase | str) -> None:
        """Move to ``phase``; RESU entry and exit go through enter_resu() / commit()."""
        self._require_manual("set_phase")
        try:
            phase = Phase(phase)
        except ValueError:
            allowed = [p.value for p in Phase]
            raise ValueError(
                f"set_phase(): phase must be one of {allowed}, got {phase!r}"
            ) from None
        if phase is Phase.RESU:
            self.enter_resu()
            return
        if self.phase is Phase.RESU:
            raise RuntimeError("set_phase(): the RESU phase is running; call commit() to leave it")
        self.phase = phase

    def _require_manual(self, method: str) -> None:
        if not self.config.manual:
            raise RuntimeError(
                f"{method}(): the schedule is automatic; build with manual=True to drive phases by hand"
            )

    def _require_managed(self, method: str) -> None:
        if len(self.state) == 0:
            raise ValueError(
                f"{method}(): no managed weight found (run a forward pass first; "
                f"report():\n{self.report()})"
            )

    # -- transitions ------------------------------------------------------------------------

    def _generator(self, weight: ManagedWeight, purpose: str) -> torch.Generator:
        """A generator on the weight's device, seeded by (seed, weight, cycle, purpose).

        Seeding by name rather than by draw order keeps every draw reproducible across graph
        breaks, resumed runs and managed sets that grow.
        """
        key = f"{self.config.seed}|{weight.name}|{self.cycle}|{purpose}".encode()
        return torch.Generator(device=weight.param.device).manual_seed(zlib.crc32(key))

    def _context(self) -> TransitionContext:
        return TransitionContext(self.config, self.optimizer, self._bridge, self._generator)

    def _prune(self, sparsity: float, criterion: str | None = None) -> None:
        criterion = criterion or self.config.criterion
        layers = prune_weights(self._context(), list(self.state), sparsity, criterion)
        self.target_sparsity = sparsity
        self._pruned = True
        self.phase = Phase.STABILIZE
        self._record("prune", target=sparsity, layers=layers)

    # -- RigL (method="rigl") ------------------------------------------------------------------

    def _rigl_end_step(self) -> int:
        return int(self.config.rigl_end * self.config.run_steps)

    def _rigl_init(self) -> None:
        """RigL starts sparse: a random mask at the final sparsity before the first step."""
        self._prune(self.config.sparsity, criterion="random")

    def _rigl_updates_after(self, step: int) -> bool:
        """Whether RigL changes the masks once optimizer step ``step`` is done."""
        config = self.config
        return (
            config.method == "rigl"
            and self._pruned
            and self.phase is not Phase.PAUSED
            and step % config.rigl_interval == 0
            and 0 < step < self._rigl_end_step()
        )

    def _rigl_update(self) -> None:
        fraction = rigl_fraction(self.step_count, self._rigl_end_step(), self.config.rigl_fraction)
        layers = regrow_weights(self._context(), list(self.state), fraction)
        self._record("rigl", fraction=fraction, layers=layers)

    # -- RESU ------------------------------------------------------------------------------------

    def _enter_resu(self) -> None:
        selected = enter_resu_weights(self._context(), list(self.state))
        self.resu_steps = 0
        self.phase = Phase.RESU
        self._record("resu", layers=selected)

    def select_by_gradient(self, weight: ManagedWeight, gradient: torch.Tensor) -> torch.Tensor:
        """``topk``: re-choose S from ``G`` (see ``transitions.reselect_by_gradient``)."""
        return reselect_by_gradient(self._context(), weight, gradient, f"theta{self.resu_steps}")

    def _commit(self) -> None:
        config = self.config
        budget = amnesty_budget(
            min(self.cycle, config.cycles - 1), config.cycles, config.r_start, config.r_end
        )
        layers = commit_weights(self._context(), list(self.state), budget, self.target_sparsity)
        self._record("commit", budget=budget, layers=layers)
        self._end_cycle()

    def _record(self, event: str, **data: Any) -> None:
        self.history.append({"event": event, "cycle": self.cycle, "step": self.step_count, **data})

    # -- views ------------------------------------------------------------------------------

    def masks(self) -> dict[str, torch.Tensor | None]:
        """Bool mask per managed weight name (None while never pruned)."""
        return {w.name: w.mask() for w in self.state}

    def resurrected_per_cycle(self) -> list[int]:
        """Total resurrected weights at each commit so far."""
        return [
            sum(layer["resurrected"] for layer in entry["layers"].values())
            for entry in self.history
            if entry["event"] == "commit"
        ]

    def export(self, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Plain state dict of the original model, managed weights times their masks."""
        from resu_compile.export import export_state_dict

        if model is None:
            model = self._module() if self._module is not None else None
            if model is None:
                raise ValueError("export(): no model recorded at compile time; pass export(model)")
        return export_state_dict(self, model)

    def _check_checkpoint_weights(self, weights: dict[str, Any]) -> None:
        """With the model known, every checkpoint weight must be one of its parameters."""
        module = self._module() if self._module is not None else None
        if module is None:
            return
        params = dict(module.named_parameters())
        for name in weights:
            if name not in params:
                raise ValueError(
                    f"load_state_dict: checkpoint manages {name!r}, which this model does not have"
                )

    def report(self) -> str:
        """Managed weights (name, shape, ops, sparsity) and skipped candidates with reasons."""
        return render_report(self)

    def telemetry(self, totals_only: bool = False) -> str:
        """METHOD.md section 6 as a table: per layer and cycle, target and actual sparsity,
        resurrected weights and rate, churn, survivors and amnesty budget used, with model
        totals weighted by layer size (the data itself is ``history``)."""
        sizes = {weight.name: weight.numel for weight in self.state}
        return render_history(self.history, layer_sizes=sizes, totals_only=totals_only)

    # -- persistence ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (``torch.load(weights_only=True)``-safe)."""
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "phase": self.phase.value,
            "cycle": self.cycle,
            "step_count": self.step_count,
            "resu_steps": self.resu_steps,
            "paused_steps": self.paused_steps,
            "target_sparsity": self.target_sparsity,
            "nonfinite_steps": self.nonfinite_steps,
            "history": self.history,
            "weights": self.state.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; refuses (changing nothing) if it does not fit."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"load_state_dict: not a resu-compile controller state of format {STATE_FORMAT}"
            )
        saved, current = state["config"], self.config.to_dict()
        for option in _METHOD_OPTIONS:
            if saved.get(option) != current[option]:
                raise ValueError(
                    f"load_state_dict: option '{option}' differs: checkpoint {saved.get(option)!r}, "
                    f"this model {current[option]!r}"
                )
        phase = Phase(state["phase"])
        self._check_checkpoint_weights(state["weights"])
        self.state.load_state_dict(state["weights"])
        self.phase = phase
        self.cycle = int(state["cycle"])
        self.step_count = int(state["step_count"])
        self.resu_steps = int(state["resu_steps"])
        self.paused_steps = int(state["paused_steps"])
        self.target_sparsity = float(state["target_sparsity"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.history = list(state["history"])
        self._pruned = any("mask_bits" in entry for entry in state["weights"].values())
