"""ResuConfig: every option of resu-compile in one validated, serialisable object.

Options are validated when the config is built, so a typo or an out-of-range value fails before any
model is touched, with a message naming the option and what is allowed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from resu_compile.method.pruning import CRITERIA, DISTRIBUTIONS

ParamFilter = str | Sequence[str] | Callable[[str, Any], bool] | None

METHODS = ("resu", "dense", "oneshot", "gmp", "rigl")
SCHEDULES = ("linear", "cubic", "constant")
COMPILERS = ("inductor", "aot_eager", "eager")
SELECTIONS = ("random", "all", "topk", "consistency")
THETA_OPTIMIZERS = ("sgd", "momentum", "adamw")
AMNESTY_SCORES = ("magnitude", "gradient", "wanda")
NAN_POLICIES = ("skip", "raise")
GRADIENT_MASKS = ("graph", "optimizer")


def _require(condition: bool, option: str, allowed: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"ResuConfig: option '{option}' must be {allowed}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_range(value: Any, low: float, high: float, *, high_open: bool = False) -> bool:
    if not _is_number(value) or math.isnan(value):
        return False
    return low <= value < high if high_open else low <= value <= high


@dataclass(frozen=True)
class ResuConfig:
    """Options of a RESU run. Defaults follow METHOD.md except where the accuracy study says
    otherwise (README, "Defaults from evidence"): the theta-optimizer is "adamw" at 1e-3 (METHOD.md:
    sgd at 1e-4; ``benchmarks/sweep_defaults.py``), and the RESU phase no longer freezes the rest of
    the network (``freeze_active=False, freeze_others=False``; METHOD.md freezes both), which
    ``benchmarks/accuracy.py`` measures as ``resu-unfrozen`` against the frozen ``resu-random``.

    Method:
        method: "resu" (the RESU cycle), or a baseline on the same compile path: "dense" (never
            prunes), "oneshot" (one prune to ``sparsity`` at the end of cycle 0's TRAIN phase, then
            masked fine-tuning), "gmp" (gradual magnitude pruning: a prune per cycle, no RESU
            phase, cubic schedule by default) or "rigl" (random init at ``sparsity`` before the
            first step, ERK by default, then RigL's drop / grow every ``rigl_interval`` steps until
            ``rigl_end`` of the run with the cosine-decayed fraction ``rigl_fraction``).
    Schedule:
        sparsity: final fraction of pruned weights per managed layer, in [0, 1).
        cycles: number of TRAIN / PRUNE / STABILIZE / RESU / COMMIT cycles.
        steps_per_cycle / total_steps: cycle length in optimizer steps (give at most one;
            ``total_steps`` is split evenly over the cycles). Default: 1000 steps per cycle.
        phase_fractions: (train, stabilize, resu) shares of a cycle; they must sum to 1.
        schedule: "linear" (s * (c + 1) / C), "cubic" (Zhu & Gupta), "constant", or an explicit
            list of per-cycle sparsities (one per cycle, each in [0, 1); a decreasing list
            densifies). Default: "cubic" for gmp, "constant" with a ``pattern``, else "linear".
        pause_after, on_pause: cycles after which the schedule pauses. The controller then calls
            ``on_pause(model, cycle)`` with the module given to ``resu.compile`` (e.g. a
            reinforcement-learning stage, which may train it, compiled or not: masks stay enforced
            and its steps do not move the schedule) and resumes; with no
            callback it stays paused until ``model.resu.resume()``.
        manual: if True the controller never changes phase by itself; the user calls
            ``prune()``, ``enter_resu()`` and ``commit()`` (method "resu" only).
    Which weights:
        include / exclude: glob pattern(s) on parameter names, or a callable
            ``(name, param) -> bool``. Applied on top of the default rule (2-D+ float params used
            only as matmul weights).
    Pruning:
        criterion, distribution: pruning rule (section 3 of METHOD.md). "wanda" compares
            ``|W| * ||X_j||`` within each output row and needs input norms recorded by forward
            passes inside ``model.resu.calibrate()`` before each prune; "global" and "erk" set
            per-layer counts that the later commits keep. Distribution default: "erk" for rigl,
            else "uniform".
        pattern: "N:M" (e.g. "2:4") keeps the top N of every M consecutive inputs of a row at
            every prune and commit; ``sparsity`` must then be 1 - N/M.
    RESU phase:
        selection, alpha: which pruned coordinates train, and what fraction: "random" (default),
            "all", "topk" (largest ``|G|`` at the phase's first step, re-chosen every ``refresh``
            RESU steps if ``refresh`` > 0) or "consistency" (per step, see METHOD.md; ``alpha`` is
            k_select / p, ``screen_fraction`` k_screen / p, ``consistency_tau`` the threshold on
            C and ``consistency_beta`` the EMA factor; the theta-optimizer steps on ``C * g``).
        freeze_active: if True, active weights keep their values during RESU (METHOD.md's
            rule). Default False: the user's optimizer keeps training them (masked) while theta
            trains, with theta's state still in the optimizer's pruned slots.
        freeze_others: if True, parameters that are not managed (biases, norms, embeddings) are
            frozen during RESU too (METHOD.md's rule; default False).
        theta_optimizer, theta_lr, theta_betas, theta_weight_decay, theta_init_eps: the RESU
            phase's optimizer for theta and its initialisation ``eps * sigma_A * N(0, 1)``.
        amnesty, amnesty_score, r_start, r_end: the commit tournament and its budget r(c); scores
            "magnitude" ``|W_eff|``, "gradient" ``|W_eff| * |G|`` (G of the last RESU step) or
            "wanda" ``|W_eff| * ||X_j||`` (needs calibrate passes).
        carry_theta_state: a resurrected weight keeps theta's optimizer state (first / second
            moments) instead of starting from zero.
        seed: seeds every random draw (selection, theta init) so runs are reproducible.
        nan_policy: "skip" leaves masks, theta and weights untouched on a step whose managed
            gradients hold NaN/Inf (and counts it); "raise" raises instead.
    Compiler:
        compiler: inner compiler the rewritten graphs are handed to.
        gradient_mask: where sparse phases apply the mask: "optimizer" (our fused masked SGD /
            Adam / AdamW update, one multi-tensor launch) or "graph" (zeroed in the compiled
            backward, fused into the kernel that writes the gradient, after which the user's own
            optimizer keeps pruned weights at zero). benchmarks/overhead.py measures both; the
            default is the faster one there.
    """

    method: str = "resu"
    sparsity: float = 0.7
    cycles: int = 5
    steps_per_cycle: int | None = None
    total_steps: int | None = None
    phase_fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)
    schedule: str | tuple[float, ...] | None = None
    pause_after: tuple[int, ...] = ()
    on_pause: Callable[[Any, int], None] | None = None
    manual: bool = False
    include: ParamFilter = None
    exclude: ParamFilter = None
    criterion: str = "magnitude"
    distribution: str | None = None
    pattern: str | None = None
    selection: str = "random"
    alpha: float = 0.2
    refresh: int = 0
    screen_fraction: float = 0.5
    consistency_tau: float = 0.5
    consistency_beta: float = 0.9
    freeze_active: bool = False
    theta_optimizer: str = "adamw"
    theta_lr: float = 1e-3
    theta_betas: tuple[float, float] = (0.9, 0.999)
    theta_weight_decay: float = 0.0
    theta_init_eps: float = 0.1
    freeze_others: bool = False
    amnesty: bool = True
    amnesty_score: str = "magnitude"
    r_start: float = 0.10
    r_end: float = 0.02
    carry_theta_state: bool = False
    rigl_interval: int = 100
    rigl_fraction: float = 0.3
    rigl_end: float = 0.75
    seed: int = 0
    nan_policy: str = "skip"
    compiler: str = "inductor"
    gradient_mask: str = "optimizer"

    def __post_init__(self) -> None:
        for name in ("schedule", "pause_after"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.schedule is None:
            default = "cubic" if self.method == "gmp" else "linear"
            object.__setattr__(self, "schedule", "constant" if self.pattern else default)
        if self.distribution is None:
            object.__setattr__(self, "distribution", "erk" if self.method == "rigl" else "uniform")
        for name in ("phase_fractions", "theta_betas"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **kwargs: Any) -> ResuConfig:
        """Build from a dict (``torch.compile(..., options=...)``) and/or keyword arguments.

        Unknown names raise ``ValueError`` listing the allowed ones.
        """
        merged: dict[str, Any] = dict(options or {})
        merged.update(kwargs)
        allowed = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        unknown = sorted(set(merged) - set(allowed))
        if unknown:
            raise ValueError(
                f"ResuConfig: unknown option(s) {unknown}; allowed options: {', '.join(allowed)}"
            )
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        """Serialisable view (callable filters are recorded by their repr only)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if callable(value):
                value = f"<callable {getattr(value, '__qualname__', repr(value))}>"
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    # -- derived quantities -------------------------------------------------------------------

    @property
    def cycle_length(self) -> int:
        """Optimizer steps in one cycle."""
        if self.steps_per_cycle is not None:
            return self.steps_per_cycle
        if self.total_steps is not None:
            return self.total_steps // self.cycles
        return 1000

    @property
    def phase_steps(self) -> tuple[int, int, int]:
        """(train, stabilize, resu) steps of one cycle; resu takes the rounding remainder."""
        length = self.cycle_length
        train = round(self.phase_fractions[0] * length)
        stabilize = round(self.phase_fractions[1] * length)
        return train, stabilize, length - train - stabilize

    @property
    def run_steps(self) -> int:
        """Optimizer steps of the whole schedule (``cycles`` cycles)."""
        return self.cycles * self.cycle_length

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of the ``pattern`` option, or None."""
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    def selects(self, name: str, param: Any) -> bool:
        """Whether the include / exclude filters keep the parameter ``name``."""
        if self.include is not None and not _matches(self.include, name, param):
            return False
        return not (self.exclude is not None and _matches(self.exclude, name, param))

    # -- validation ---------------------------------------------------------------------------

    def _validate_pattern(self) -> None:
        if self.pattern is None:
            return
        parts = self.pattern.split(":") if isinstance(self.pattern, str) else []
        valid = len(parts) == 2 and all(p.isdigit() for p in parts)
        n, m = (int(p) for p in parts) if valid else (0, 0)
        _require(
            valid and 0 < n < m,
            "pattern",
            "None or 'N:M' with integers 0 < N < M (e.g. '2:4')",
            self.pattern,
        )
        _require(
            abs(self.sparsity - (1 - n / m)) < 1e-9,
            "sparsity",
            f"{1 - n / m} with pattern {self.pattern!r} (the pattern fixes the sparsity)",
            self.sparsity,
        )
        _require(
            self.schedule == "constant",
            "schedule",
            f"'constant' with pattern {self.pattern!r} (every prune gives the pattern)",
            self.schedule,
        )
        _require(
            self.method in ("resu", "oneshot"),
            "method",
            f"'resu' or 'oneshot' with pattern {self.pattern!r}",
            self.method,
        )

    def _validate(self) -> None:
        _require(self.method in METHODS, "method", f"one of {METHODS}", self.method)
        _require(
            _in_range(self.sparsity, 0.0, 1.0, high_open=True),
            "sparsity",
            "a number in [0, 1)",
            self.sparsity,
        )
        _require(
            isinstance(self.cycles, int) and not isinstance(self.cycles, bool) and self.cycles >= 1,
            "cycles",
            "an integer >= 1",
            self.cycles,
        )
        if self.steps_per_cycle is not None and self.total_steps is not None:
            raise ValueError("ResuConfig: give at most one of 'steps_per_cycle' and 'total_steps'")
        for name in ("steps_per_cycle", "total_steps"):
            value = getattr(self, name)
            _require(
                value is None
                or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                name,
                "a positive integer or None",
                value,
            )
        fractions = self.phase_fractions
        _require(
            isinstance(fractions, tuple)
            and len(fractions) == 3
            and all(_in_range(f, 0.0, 1.0) for f in fractions)
            and abs(sum(fractions) - 1.0) < 1e-6,
            "phase_fractions",
            "three numbers in [0, 1] (train, stabilize, resu) summing to 1",
            fractions,
        )
        _require(
            self.cycle_length >= 1,
            "total_steps",
            f"at least 'cycles' ({self.cycles}) steps",
            self.total_steps,
        )
        train, _, resu = self.phase_steps
        _require(
            resu >= 1 and train >= 0,
            "phase_fractions",
            f"a split that leaves the RESU phase at least 1 of the {self.cycle_length} steps per cycle",
            fractions,
        )
        if isinstance(self.schedule, tuple):
            _require(
                len(self.schedule) == self.cycles
                and all(_in_range(s, 0.0, 1.0, high_open=True) for s in self.schedule),
                "schedule",
                f"one of {SCHEDULES} or a list of {self.cycles} sparsities in [0, 1)",
                self.schedule,
            )
        else:
            _require(
                self.schedule in SCHEDULES,
                "schedule",
                f"one of {SCHEDULES} or a list of per-cycle sparsities",
                self.schedule,
            )
        _require(isinstance(self.manual, bool), "manual", "a bool", self.manual)
        _require(
            not self.manual or self.method == "resu",
            "manual",
            "False unless method is 'resu' (the baselines run their own schedule)",
            self.manual,
        )
        _require(
            isinstance(self.pause_after, tuple)
            and all(_is_int(c) and 0 <= c < self.cycles for c in self.pause_after),
            "pause_after",
            f"a list of cycle numbers in [0, {self.cycles})",
            self.pause_after,
        )
        _require(
            self.on_pause is None or callable(self.on_pause),
            "on_pause",
            "None or a callable (model, cycle)",
            self.on_pause,
        )
        self._validate_pattern()
        for name in ("include", "exclude"):
            _validate_filter(name, getattr(self, name))
        for name, allowed in (
            ("criterion", CRITERIA),
            ("distribution", DISTRIBUTIONS),
            ("selection", SELECTIONS),
            ("theta_optimizer", THETA_OPTIMIZERS),
            ("amnesty_score", AMNESTY_SCORES),
            ("nan_policy", NAN_POLICIES),
            ("compiler", COMPILERS),
            ("gradient_mask", GRADIENT_MASKS),
        ):
            value = getattr(self, name)
            _require(value in allowed, name, f"one of {allowed}", value)
        _require(
            _in_range(self.alpha, 0.0, 1.0) and self.alpha > 0,
            "alpha",
            "a number in (0, 1]",
            self.alpha,
        )
        _require(
            _in_range(self.theta_lr, 0.0, math.inf) and self.theta_lr > 0,
            "theta_lr",
            "a positive number",
            self.theta_lr,
        )
        betas = self.theta_betas
        _require(
            isinstance(betas, tuple)
            and len(betas) == 2
            and all(_in_range(b, 0.0, 1.0, high_open=True) for b in betas),
            "theta_betas",
            "two numbers in [0, 1)",
            betas,
        )
        _require(
            _in_range(self.theta_weight_decay, 0.0, math.inf),
            "theta_weight_decay",
            "a number >= 0",
            self.theta_weight_decay,
        )
        _require(
            _in_range(self.theta_init_eps, 0.0, math.inf),
            "theta_init_eps",
            "a number >= 0",
            self.theta_init_eps,
        )
        for name in ("amnesty", "freeze_others", "freeze_active", "carry_theta_state"):
            _require(isinstance(getattr(self, name), bool), name, "a bool", getattr(self, name))
        _require(
            _is_int(self.refresh) and self.refresh >= 0,
            "refresh",
            "an integer >= 0 (RESU steps between topk re-selections; 0: never)",
            self.refresh,
        )
        for name in ("screen_fraction", "consistency_tau"):
            value = getattr(self, name)
            _require(_in_range(value, 0.0, 1.0), name, "a number in [0, 1]", value)
        _require(
            _in_range(self.consistency_beta, 0.0, 1.0, high_open=True),
            "consistency_beta",
            "a number in [0, 1)",
            self.consistency_beta,
        )
        _require(
            _is_int(self.rigl_interval) and self.rigl_interval >= 1,
            "rigl_interval",
            "an integer >= 1",
            self.rigl_interval,
        )
        _require(
            _in_range(self.rigl_fraction, 0.0, 1.0),
            "rigl_fraction",
            "a number in [0, 1]",
            self.rigl_fraction,
        )
        _require(
            _in_range(self.rigl_end, 0.0, 1.0), "rigl_end", "a number in [0, 1]", self.rigl_end
        )
        for name in ("r_start", "r_end"):
            _require(
                _in_range(getattr(self, name), 0.0, 1.0),
                name,
                "a number in [0, 1]",
                getattr(self, name),
            )
        _require(
            isinstance(self.seed, int) and not isinstance(self.seed, bool),
            "seed",
            "an integer",
            self.seed,
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_filter(option: str, value: ParamFilter) -> None:
    if value is None or callable(value) or isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return
    raise ValueError(
        f"ResuConfig: option '{option}' must be a glob string, a list of globs, or a callable "
        f"(name, param) -> bool, got {value!r}"
    )


def _matches(pattern: ParamFilter, name: str, param: Any) -> bool:
    if callable(pattern):
        return bool(pattern(name, param))
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or ())
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
