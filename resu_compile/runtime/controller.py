"""The controller: the ``.resu`` handle of a compiled model.

It counts optimizer steps, asks the method's schedule which transition is due, runs it between
steps (eagerly, in place, under ``no_grad``), and tells the compiled graphs which variant to run.
Graph code never reads a phase flag, so switching phases never recompiles. The optimizer step
itself is :class:`~resu_compile.optim.step.ManagedStep`'s, from the plan built here.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from resu_compile.config import ResuConfig
from resu_compile.method.schedule import amnesty_budget
from resu_compile.optim.clip import clip_applied_grad_norm_
from resu_compile.optim.slots import reapply_masks
from resu_compile.optim.step import ManagedStep
from resu_compile.runtime import checkpoint, sharded_checkpoint
from resu_compile.runtime.phase import Phase, Progress, Transition
from resu_compile.runtime.schedules import RiglSchedule, schedule_for
from resu_compile.runtime.sharded import check_sharded_optimizer
from resu_compile.runtime.step_guards import (
    check_calibration_for,
    check_not_sharded_after_compile,
    check_optimizer_state,
    weights_finite,
    why_no_managed_weight,
)
from resu_compile.runtime.step_plan import plan_step
from resu_compile.runtime.transitions import (
    TransitionContext,
    check_pattern,
    commit_weights,
    enter_resu_weights,
    input_norms,
    prune_weights,
    regrow_weights,
)
from resu_compile.state import ManagedWeight, StateManager
from resu_compile.views.export import export_state_dict
from resu_compile.views.report import render_report
from resu_compile.views.telemetry import render_history


class PhaseController:
    """Drives one compiled model through its method's schedule (the ``model.resu`` handle)."""

    def __init__(
        self,
        config: ResuConfig,
        param_names: dict[int, str] | None = None,
        module: torch.nn.Module | None = None,
    ) -> None:
        self.config = config
        self.state = StateManager()
        self.schedule = schedule_for(config)
        self.phase = Phase.TRAIN
        self.cycle = 0
        self.step_count = 0
        self.resu_steps = 0
        self.paused_steps = 0
        self.target_sparsity = 0.0
        self.history: list[dict[str, Any]] = []
        self.pruned = False
        #: Transitions put off because a managed weight held NaN / Inf (``nan_policy="skip"``).
        self.postponed_transitions = 0
        self._module = weakref.ref(module) if module is not None else None
        self._param_names = param_names or {}
        self._calibrating = False
        self._sparse_forward = False
        self._pattern_checked = 0
        self._warned_pause = False
        #: What the next step checks of the optimizer's state: "fresh" (a new run), "strict" /
        #: "warn" (after a load), or nothing.
        self._optimizer_check: str | None = "fresh"
        self._managed_step = ManagedStep()

    # -- what the compiled graphs ask -------------------------------------------------------

    @property
    def calibrating(self) -> bool:
        return self._calibrating

    def graph_variant(self) -> str:
        """The graph variant the current phase runs (see ``backend.VARIANTS``)."""
        if self._calibrating:
            return "calibrate"
        if self.phase is Phase.RESU or not self.pruned:
            return "dense"  # the RESU phase's W_eff fills pruned slots with theta: no pattern
        masked = self.config.gradient_mask == "graph" and not self.needs_dense_gradient()
        if self.config.semi_sparse:
            return "semi_sparse_masked" if masked else "semi_sparse"
        return "sparse" if masked else "dense"

    def record_forward(self, masks_gradients: bool) -> None:
        """The dispatcher ran a variant (``masks_gradients``: one whose backward zeroes the pruned
        gradients): the next step trusts a graph mask only if a compiled forward served such a
        variant since the last step (a prune in between, e.g. RigL's initial one, or an eager
        forward in a pause callback, masks nothing)."""
        self._sparse_forward = masks_gradients

    def needs_dense_gradient(self) -> bool:
        """Whether the step in progress must see ``G`` on pruned coordinates too (RigL's grow
        step after it reads it), so the graph may not mask the gradient."""
        return self.schedule.updates_masks_after(self.step_count + 1, self._progress())

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
        if self._managed_step.attached and optimizer is self._managed_step.optimizer:
            raise RuntimeError(
                "step(): this optimizer is attached; call optimizer.step() instead of resu.step()"
            )
        self._begin_step(optimizer)
        try:
            optimizer.step()
        finally:
            self._end_step(optimizer)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook ``optimizer`` so that a plain ``optimizer.step()`` does what :meth:`step` does.
        Works before the first forward pass; the first step checks the managed weights."""
        if len(self.state):
            self._managed_step.validate(optimizer, list(self.state))
        self._managed_step.attach(optimizer, self._begin_step, self._end_step)

    def detach(self) -> None:
        self._managed_step.detach()

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._managed_step.optimizer

    @property
    def nonfinite_steps(self) -> int:
        """Steps whose managed updates were skipped for NaN / Inf gradients."""
        return self._managed_step.nonfinite_steps

    def _begin_step(self, optimizer: torch.optim.Optimizer) -> None:
        weights = list(self.state)
        if not weights:
            check_not_sharded_after_compile(self.module(), self._param_names)
            why = why_no_managed_weight(self.module())
            raise ValueError(f"step(): no managed weight found: {why}\n{self.report()}")
        self._managed_step.validate(optimizer, weights)
        check_sharded_optimizer(optimizer, weights)
        if self._optimizer_check is not None:
            mode, self._optimizer_check = self._optimizer_check, None
            try:
                check_optimizer_state(
                    mode,
                    optimizer,
                    weights,
                    step_count=self.step_count,
                    in_resu=self.phase is Phase.RESU,
                )
            except ValueError:
                self._optimizer_check = mode  # refused: checked again at the next step
                raise
        self.advance()
        self._check_upcoming(weights)
        self._managed_step.begin(
            optimizer,
            plan_step(
                self.config,
                weights,
                in_resu=self.phase is Phase.RESU,
                resu_steps=self.resu_steps,
                graph_masked=self._sparse_forward,
                draws=self._generator,
            ),
        )

    def _check_upcoming(self, weights: list[ManagedWeight]) -> None:
        """Refuse, before this step's update, what would fail in the transition due after it:
        a weight an N:M pattern cannot split (checked whenever the managed set grows), or a
        Wanda score without calibrated input norms."""
        if len(weights) != self._pattern_checked:
            check_pattern(self.config, weights)
            self._pattern_checked = len(weights)
        if not self.config.manual:
            upcoming = self.schedule.due(
                Progress(self.phase, self.cycle, self.step_count + 1, self.pruned)
            )
            check_calibration_for(self.config, upcoming, weights)

    def _end_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._managed_step.finish(optimizer)
        self._sparse_forward = False
        if self.phase is Phase.PAUSED:
            self.paused_steps += 1
            return
        self.step_count += 1
        if self.phase is Phase.RESU:
            self.resu_steps += 1
        if self.schedule.updates_masks_after(
            self.step_count, self._progress()
        ) and self._weights_finite("rigl_update"):
            self._rigl_update()
        self.advance()

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        parameters: Iterable[torch.Tensor] | None = None,
        error_if_nonfinite: bool = False,
    ) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` of the gradients this step applies (default: every
        parameter of the compiled model); call it between ``backward()`` and the step.

        With ``gradient_mask="optimizer"`` a managed weight's ``.grad`` holds the dense gradient
        in the sparse phases (the mask is applied in the optimizer step), so torch's own
        function would also count the pruned coordinates. Here the norm reads them as 0 wherever
        ``gradient_mask="graph"`` would have masked them (sparse phases; the RESU phase and
        RigL's grow step read the dense gradient), so both modes clip alike. ``.grad`` itself
        keeps the dense values, scaled like the rest.
        """
        if parameters is None:
            module = self.module()
            if module is None:
                raise ValueError("clip_grad_norm_(): no model recorded; pass parameters=")
            parameters = module.parameters()
        masked = self.pruned and self.phase is not Phase.RESU and not self.needs_dense_gradient()

        def mask_of(param: torch.Tensor) -> torch.Tensor | None:
            weight = self.state.get(param) if masked else None
            return None if weight is None or weight.mask_bits is None else weight.mask()

        return clip_applied_grad_norm_(parameters, mask_of, max_norm, norm_type, error_if_nonfinite)

    # -- schedule ---------------------------------------------------------------------------

    def _progress(self) -> Progress:
        return Progress(self.phase, self.cycle, self.step_count, self.pruned)

    def current_target(self) -> float:
        """Target sparsity of the current cycle (the final target once the schedule is done)."""
        return self.schedule.target(self.cycle)

    def advance(self) -> None:
        """Run every transition the step count has reached (automatic schedule only).

        A transition that would read non-finite weights is refused (``nan_policy="raise"``) or
        put off to the next step and counted (``"skip"``): a NaN weight must never decide a mask.
        """
        if self.config.manual:
            return
        while (transition := self.schedule.due(self._progress())) is not None:
            reads_weights = transition.kind != "end_cycle"
            if reads_weights and not self._weights_finite(transition.kind):
                self.postponed_transitions += 1
                self._record("postponed", transition=transition.kind)
                return
            self._run(transition)

    def _weights_finite(self, purpose: str, *, manual: bool = False) -> bool:
        """:func:`~resu_compile.runtime.step_guards.weights_finite` of the managed weights; a
        ``manual`` call raises like ``nan_policy="raise"``."""
        raise_ = manual or self.config.nan_policy == "raise"
        return weights_finite(list(self.state), purpose, raise_=raise_)

    def _run(self, transition: Transition) -> None:
        if transition.kind == "prune":
            self._prune(transition.sparsity, transition.criterion)  # type: ignore[arg-type]
        elif transition.kind == "enter_resu":
            self._enter_resu()
        elif transition.kind == "commit":
            self._commit()
        elif transition.kind == "end_cycle":
            self._end_cycle()
        else:
            raise ValueError(f"unknown transition {transition.kind!r}")

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
                self._enforce_masks_after_pause()
                self.resume()

    def _enforce_masks_after_pause(self) -> None:
        """A pause callback may train with a plain ``optimizer.step()`` (not through
        :meth:`step`): the masks are applied again to the weights and to their optimizer state,
        and Adam's step counters are read afresh. Saying so once points the user to
        :meth:`step` (or :meth:`attach`), which keeps the masks during the pause too."""
        self._managed_step.forget_step_counts()
        dirty = reapply_masks(self.optimizer, list(self.state))
        if dirty and not self._warned_pause:
            self._warned_pause = True
            warnings.warn(
                f"on_pause: the callback left pruned weights or their optimizer state nonzero "
                f"({dirty}): it stepped the optimizer outside resu; the masks were applied again. "
                "Train inside a pause with model.resu.step(optimizer) or an attached optimizer",
                stacklevel=4,
            )

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
        if len(self.state) == 0:
            raise ValueError(
                "prune(): no managed weight found (run a forward pass first; "
                f"report():\n{self.report()})"
            )
        self._weights_finite("prune", manual=True)
        self._prune(float(target))

    def enter_resu(self) -> None:
        """Start the RESU phase: theta on the selected pruned coordinates."""
        self._require_manual("enter_resu")
        if self.phase is Phase.RESU:
            raise RuntimeError("enter_resu(): the RESU phase is already running")
        if not self.pruned:
            raise RuntimeError("enter_resu(): nothing is pruned yet; call prune() first")
        self._weights_finite("enter_resu", manual=True)
        self._enter_resu()

    def commit(self) -> None:
        """End the RESU phase with the amnesty tournament (or a merge if amnesty is off)."""
        self._require_manual("commit")
        if self.phase is not Phase.RESU:
            raise RuntimeError(
                f"commit(): only valid in the RESU phase (phase is {self.phase.value})"
            )
        self._weights_finite("commit", manual=True)
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

    # -- transitions ------------------------------------------------------------------------

    def _generator(self, weight: ManagedWeight, purpose: str) -> torch.Generator:
        """A generator on the weight's device, seeded by (seed, weight, cycle, purpose).

        Seeding by name rather than by draw order keeps every draw reproducible across graph
        breaks, resumed runs and managed sets that grow.
        """
        key = f"{self.config.seed}|{weight.name}|{self.cycle}|{purpose}".encode()
        return torch.Generator(device=weight.param.device).manual_seed(zlib.crc32(key))

    def _context(self) -> TransitionContext:
        return TransitionContext(self.config, self.optimizer, self._generator)

    def _prune(self, sparsity: float, criterion: str | None = None) -> None:
        criterion = criterion or self.config.criterion
        layers = prune_weights(self._context(), list(self.state), sparsity, criterion)
        self.target_sparsity = sparsity
        self.pruned = True
        self.phase = Phase.STABILIZE
        self._record("prune", target=sparsity, layers=layers)

    def _rigl_update(self) -> None:
        assert isinstance(self.schedule, RiglSchedule)
        fraction = self.schedule.fraction(self.step_count)
        layers = regrow_weights(self._context(), list(self.state), fraction)
        self._record("rigl", fraction=fraction, layers=layers)

    def _enter_resu(self) -> None:
        selected = enter_resu_weights(self._context(), self._trainable())
        self.resu_steps = 0
        self.phase = Phase.RESU
        self._record("resu", layers=selected)

    def _commit(self) -> None:
        config = self.config
        budget = amnesty_budget(
            min(self.cycle, config.cycles - 1), config.cycles, config.r_start, config.r_end
        )
        layers = commit_weights(self._context(), self._trainable(), budget, self.target_sparsity)
        self._record("commit", budget=budget, layers=layers)
        if not config.amnesty and not config.manual and self.cycle == config.cycles - 1:
            # The merge leaves theta's places active and "the next PRUNE re-prunes" (METHOD.md
            # section 5); after the last cycle no PRUNE follows, so it runs here, or the run
            # would end denser than its sparsity.
            self._prune(self.target_sparsity)
        self._end_cycle()

    def _trainable(self) -> list[ManagedWeight]:
        """The managed weights that train. A frozen one (selected by ``include``) is pruned like
        the others but takes no theta: its mask stays as pruned until the next prune."""
        return [w for w in self.state if w.param.requires_grad]

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

    def module(self) -> torch.nn.Module | None:
        """The module given to ``resu.compile`` (None if it is gone or was never recorded)."""
        return self._module() if self._module is not None else None

    def export(self, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Plain state dict of the original model, managed weights times their masks."""
        self._refuse_sharded(
            "export()",
            "outside a RESU phase the sharded weights hold exact zeros on pruned coordinates: "
            "save them with torch.distributed.checkpoint.state_dict.get_model_state_dict",
        )
        model = model if model is not None else self.module()
        if model is None:
            raise ValueError("export(): no model recorded at compile time; pass export(model)")
        return export_state_dict(self.state, model)

    def report(self) -> str:
        """Managed weights (name, shape, ops, sparsity) and skipped candidates with reasons."""
        header = (
            f"phase={self.phase.value} cycle={self.cycle}/{self.config.cycles} "
            f"step={self.step_count} target={self.current_target():.4f}"
        )
        totals = self.telemetry(totals_only=True) if self.history else None
        return render_report(header, self.state, totals)

    def telemetry(self, totals_only: bool = False) -> str:
        """METHOD.md section 6 as a table: per layer and cycle, target and actual sparsity,
        resurrected weights and rate, churn, survivors and amnesty budget used, with model
        totals weighted by layer size (the data itself is ``history``)."""
        sizes = {weight.name: weight.total_numel for weight in self.state}
        return render_history(self.history, layer_sizes=sizes, totals_only=totals_only)

    # -- persistence ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (``torch.load(weights_only=True)``-safe)."""
        self._refuse_sharded(
            "state_dict()", "use sharded_state_dict() with torch.distributed.checkpoint"
        )
        return checkpoint.save(
            self.config, self.phase, self._counters(), self.history, self.state.state_dict()
        )

    def _counters(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in checkpoint.COUNTERS}

    def _refuse_sharded(self, method: str, instead: str) -> None:
        """Whole-weight views of a model whose weights are FSDP2 shards are not built."""
        sharded = [w.name for w in self.state if w.shard is not None]
        if sharded:
            raise ValueError(
                f"{method}: managed weights are FSDP2 shards ({sharded[0]!r}); {instead}"
            )

    def sharded_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` for ``torch.distributed.checkpoint`` under FSDP2: per-coordinate state
        as DTensors laid out as the weights (see :mod:`~resu_compile.runtime.sharded_checkpoint`).
        Also the template to load into: build it after one forward pass of the new model."""
        weights = {w.name: sharded_checkpoint.weight_state(w) for w in self.state}
        # A tuple is one value to DCP (a list of dicts would be flattened, key by key, and a
        # template's shorter history would miss keys).
        state = checkpoint.save(self.config, self.phase, self._counters(), self.history, weights)
        state["history"] = tuple(state["history"])
        return state

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        """Apply a :meth:`sharded_state_dict` that ``torch.distributed.checkpoint.load`` filled
        (at this or another world size)."""
        # DCP keeps the history as one tuple value (see sharded_state_dict).
        state = {**state, "history": list(state["history"])}
        loaded = checkpoint.check(state, self.config, self.module())
        sharded_checkpoint.load_weights(list(self.state), state["weights"])
        weights_saved = state["weights"].values()
        self._restore(loaded, state["history"], pruned=any(e["pruned"] for e in weights_saved))

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore a :meth:`state_dict`; refuses (changing nothing) if it does not fit.

        Load the model's and the optimizer's state saved with it first: the model's weights must
        be zero where the saved masks prune them, and the next step checks that the optimizer
        holds state for the managed weights. The whole state is validated before anything is
        applied (:func:`~resu_compile.runtime.checkpoint.check`). ``strict=False`` loads a state
        saved with other run options (schedule length, seed, ``gradient_mask``, filters), onto
        weights the masks must first be applied to, or beside a fresh optimizer, with a warning
        for each; what the masks mean (method, sparsity, pattern, ...) must always match.
        """
        if not isinstance(strict, bool):
            raise TypeError(f"load_state_dict: strict must be a bool, got {strict!r}")
        loaded = checkpoint.check(state, self.config, self.module(), strict=strict)
        self.state.load_state_dict(state["weights"])
        weights_saved = state["weights"].values()
        with torch.no_grad():
            for param, pruned in loaded.to_zero:
                param.masked_fill_(pruned, 0)
        self._managed_step.forget_step_counts()
        self._restore(loaded, state["history"], pruned=any("mask_bits" in e for e in weights_saved))
        self._optimizer_check = "strict" if strict else "warn"

    def _restore(self, loaded: checkpoint.Loaded, history: Iterable[dict], pruned: bool) -> None:
        """Apply a validated checkpoint's warnings, phase, counters and history."""
        for message in loaded.warnings:
            warnings.warn(message, stacklevel=3)
        counters = dict(loaded.counters)
        self.phase = loaded.phase
        self._managed_step.restore_nonfinite_steps(counters.pop("nonfinite_steps"))
        for key, value in counters.items():
            setattr(self, key, value)
        self.history = list(history)
        self.pruned = pruned
