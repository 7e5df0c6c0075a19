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
from resu_compile.kernels.bits import pack_bits, unpack_bits
from resu_compile.method.amnesty import amnesty_mask, amnesty_scores
from resu_compile.method.pruning import keep_top, layer_keep_counts, nm_mask, prune_scores
from resu_compile.method.rigl import rigl_fraction, rigl_regrow
from resu_compile.method.schedule import amnesty_budget, cycle_sparsities, keep_count
from resu_compile.method.selective import initial_theta, select_trainable
from resu_compile.optim.bridge import OptimizerBridge
from resu_compile.report import render_report
from resu_compile.state import ManagedWeight, StateManager
from resu_compile.telemetry import render_history

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
        step reads it), so the graph may not mask the gradient."""
        config = self.config
        upcoming = self.step_count + 1
        return (
            config.method == "rigl"
            and self._pruned
            and upcoming % config.rigl_interval == 0
            and upcoming < self._rigl_end_step()
        )

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
        weight = self.state.by_name(name)
        if weight.input_sq_norms is None:
            raise RuntimeError(f"input_norms: no calibrate pass has recorded {name!r}")
        return weight.input_sq_norms.sqrt()

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
        if after_step and self._rigl_update_due():
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

    @torch.no_grad()
    def _prune(self, sparsity: float, criterion: str | None = None) -> None:
        config = self.config
        criterion = criterion or config.criterion
        optimizer = self.optimizer
        weights = list(self.state)
        self._check_pattern(weights)
        masks = [w.mask() for w in weights]
        scores = [self._prune_scores(w, criterion) for w in weights]
        if config.distribution == "uniform" or config.nm is not None:
            counts = [keep_count(w.numel, sparsity) for w in weights]
        else:
            counts = layer_keep_counts(
                [w.numel for w in weights],
                sparsity,
                config.distribution,
                shapes=[tuple(w.shape) for w in weights],
                scores=scores,
                eligible=masks,
            )
        layers = {}
        for weight, mask, score, count in zip(weights, masks, scores, counts, strict=True):
            if config.nm is not None:
                new = nm_mask(score, *config.nm, input_dim=weight.input_dim or 1)
                count = active = weight.numel * config.nm[0] // config.nm[1]
            else:
                wanda = criterion == "wanda"  # compared within each output row, as in Wanda
                output_dim = 1 - weight.input_dim if wanda else 0
                new = keep_top(score, count, mask, per_row=wanda, output_dim=output_dim)
                active = min(count, weight.active_count())
            weight.set_mask(new, active)
            weight.keep_target = count
            self._bridge.zero_coordinates(optimizer, weight.param, ~new)
            layers[weight.name] = weight.sparsity()
        self.target_sparsity = sparsity
        self._pruned = True
        self.phase = Phase.STABILIZE
        self._record("prune", target=sparsity, layers=layers)

    def _check_pattern(self, weights: list[ManagedWeight]) -> None:
        """With an N:M pattern, every managed weight's input dim must split into groups of M."""
        if self.config.nm is None:
            return
        m = self.config.nm[1]
        for weight in weights:
            size = weight.shape[weight.input_dim or 1]
            if size % m:
                raise ValueError(
                    f"pattern {self.config.pattern!r}: managed weight {weight.name!r} has "
                    f"{size} inputs, not a multiple of {m}; exclude it with exclude=[...]"
                )

    def _prune_scores(self, weight: ManagedWeight, criterion: str) -> torch.Tensor:
        return prune_scores(
            weight.param,
            criterion,
            input_norms=self._norms_for(weight, f"criterion {criterion!r}")
            if criterion == "wanda"
            else None,
            input_dim=weight.input_dim if weight.input_dim is not None else 1,
            generator=self._generator(weight, "prune"),
        )

    def _norms_for(self, weight: ManagedWeight, purpose: str) -> torch.Tensor:
        if weight.input_sq_norms is None or weight.input_dim is None:
            raise RuntimeError(
                f"{purpose} needs the input norms of {weight.name!r}: run forward passes inside "
                "`with model.resu.calibrate():` before each prune and commit"
            )
        return weight.input_sq_norms.sqrt()

    # -- RigL (method="rigl") ------------------------------------------------------------------

    def _rigl_end_step(self) -> int:
        return int(self.config.rigl_end * self.config.run_steps)

    def _rigl_init(self) -> None:
        """RigL starts sparse: a random mask at the final sparsity before the first step."""
        self._prune(self.config.sparsity, criterion="random")

    def _rigl_update_due(self) -> bool:
        config = self.config
        return (
            config.method == "rigl"
            and self._pruned
            and self.phase is not Phase.PAUSED
            and self.step_count % config.rigl_interval == 0
            and 0 < self.step_count < self._rigl_end_step()
        )

    @torch.no_grad()
    def _rigl_update(self) -> None:
        """Drop the smallest ``|W|``, grow the largest ``|G|``; grown weights start at 0 with
        zero optimizer state (they were pruned, so both already are)."""
        fraction = rigl_fraction(self.step_count, self._rigl_end_step(), self.config.rigl_fraction)
        optimizer = self.optimizer
        layers = {}
        for weight in self.state:
            if weight.param.grad is None or weight.mask_bits is None:
                continue  # unused by this step's forward: nothing to grow from
            active = weight.active_count()
            count = int(fraction * active)
            new, grown = rigl_regrow(weight.param, weight.param.grad, weight.mask(), count, active)
            self._bridge.zero_coordinates(optimizer, weight.param, ~new)
            weight.set_mask(new, active)
            layers[weight.name] = {"dropped": count, "grown": grown, "sparsity": weight.sparsity()}
        grown_counts = (
            torch.stack([entry["grown"].sum() for entry in layers.values()]).tolist()
            if layers
            else []
        )
        for entry, grown_count in zip(layers.values(), grown_counts, strict=True):
            entry["grown"] = grown_count
        self._record("rigl", fraction=fraction, layers=layers)

    # -- RESU ------------------------------------------------------------------------------------

    @torch.no_grad()
    def _enter_resu(self) -> None:
        selected = {}
        for weight in self.state:
            mask = weight.mask()
            if mask is None:
                mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.param.device)
            pruned = ~mask
            pruned_count = weight.numel - weight.active_count()
            weight.theta_buffers.clear()
            if self.config.selection == "topk":
                # S is chosen from G at the phase's first step (select_by_gradient); until then
                # no coordinate trains.
                weight.param.masked_fill_(pruned, 0)
                weight.select_bits = pack_bits(torch.zeros_like(pruned))
                selected[weight.name] = int(self.config.alpha * pruned_count)
                continue
            trainable, count = select_trainable(
                pruned,
                self.config.selection,
                self.config.alpha,
                self._generator(weight, "select"),
                pruned_count,
            )
            theta = initial_theta(
                weight.param, mask, self.config.theta_init_eps, self._generator(weight, "theta")
            )
            weight.param.copy_(torch.where(trainable, theta, weight.param.masked_fill(pruned, 0)))
            weight.select_bits = pack_bits(trainable)
            selected[weight.name] = count
        self.resu_steps = 0
        self.phase = Phase.RESU
        self._record("resu", layers=selected)

    @torch.no_grad()
    def select_by_gradient(self, weight: ManagedWeight, gradient: torch.Tensor) -> torch.Tensor:
        """``topk`` selection: S becomes the top ``alpha`` of P by ``|G|``; coordinates that join
        S get a fresh theta draw, those that leave it go back to 0. Returns the coordinates whose
        theta-optimizer state must restart (joined or left)."""
        mask = weight.mask()
        pruned = ~mask
        new, _ = select_trainable(
            pruned,
            "topk",
            self.config.alpha,
            self._generator(weight, "select"),
            weight.numel - weight.active_count(),
            gradient=gradient,
        )
        old = weight.selection()
        joined, left = new & ~old, old & ~new
        theta = initial_theta(
            weight.param,
            mask,
            self.config.theta_init_eps,
            self._generator(weight, f"theta{self.resu_steps}"),
        )
        weight.param.copy_(torch.where(joined, theta, weight.param.masked_fill(left, 0)))
        weight.select_bits = pack_bits(new)
        return joined | left

    @torch.no_grad()
    def _commit(self) -> None:
        config = self.config
        budget = amnesty_budget(
            min(self.cycle, config.cycles - 1), config.cycles, config.r_start, config.r_end
        )
        optimizer = self.optimizer
        weights = list(self.state)
        scores = [self._amnesty_scores(w) for w in weights] if config.amnesty else None
        layers = {}
        for i, weight in enumerate(weights):
            old = weight.mask()
            if old is None:
                old = torch.ones(weight.shape, dtype=torch.bool, device=weight.param.device)
            n_keep = weight.keep_target
            if n_keep is None:
                n_keep = keep_count(weight.numel, self.target_sparsity)
            trained = weight.selection()
            reserved = 0
            if scores is None:
                new, active = old | trained, None
            elif config.nm is not None:  # the pattern fixes every group's places: no quota
                new = nm_mask(scores[i], *config.nm, input_dim=weight.input_dim or 1)
                active = n_keep
            else:
                result = amnesty_mask(scores[i], old, n_keep, budget, weight.active_count())
                new, active, reserved = result.mask, min(n_keep, weight.numel), result.n_reserved
            resurrected = new & ~old
            self._bridge.zero_coordinates(optimizer, weight.param, ~new)
            self._bridge.restart_state(optimizer, weight, resurrected, config.carry_theta_state)
            revived = (
                unpack_bits(weight.revived_bits, weight.shape).to(new.device)
                if weight.revived_bits is not None
                else torch.zeros_like(new)
            )
            counts = [(~old).sum(), resurrected.sum(), (new ^ old).sum(), (revived & new).sum()]
            counts.append((resurrected & trained).sum() if trained is not None else counts[1] * 0)
            old_pruned, count, churn, survivors, trained_count = torch.stack(counts).tolist()
            weight.set_mask(new, active)
            weight.revived_bits = pack_bits(revived | resurrected).cpu()
            weight.select_bits = None
            weight.theta_buffers.clear()
            layers[weight.name] = {
                "target": self.target_sparsity,
                "sparsity": weight.sparsity(),
                "resurrected": count,
                # Winners that trained as theta; the rest of the n_R places went to untrained zeros.
                "resurrected_trained": trained_count,
                "resurrection_rate": count / old_pruned if old_pruned else 0.0,
                "churn": churn,
                # Weights resurrected at earlier commits that are still active after this one.
                "survivors": survivors,
                "reserved": reserved,
                "pruned_before": old_pruned,
                "budget": budget,
            }
        self._record("commit", budget=budget, layers=layers)
        self._end_cycle()

    def _amnesty_scores(self, weight: ManagedWeight) -> torch.Tensor:
        score = self.config.amnesty_score
        gradient = weight.param.grad
        if score == "gradient" and gradient is None:
            raise RuntimeError(
                f"commit: amnesty_score 'gradient' needs G of {weight.name!r} from the last RESU "
                "step: call commit() after backward() and before zero_grad()"
            )
        return amnesty_scores(
            weight.param,
            score,
            gradient=gradient,
            input_norms=self._norms_for(weight, "amnesty_score 'wanda'")
            if score == "wanda"
            else None,
            input_dim=weight.input_dim if weight.input_dim is not None else 1,
        )

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
