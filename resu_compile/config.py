"""ResuConfig: every option of resu-compile in one validated, serialisable object.

Each option is a field declared with :func:`option`: its section (``section``), the rule its value
must follow (``check``), the method or mode it belongs to (``scope``) and whether a checkpoint must
match it to be loaded (``checkpoint``). Validation runs when the config is built, so a typo or an
out-of-range value fails before any model is touched, with a message naming the option and what is
allowed. The README's "Options" table documents every field.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from resu_compile.method.pruning import CRITERIA, DISTRIBUTIONS

ParamFilter = str | Sequence[str] | Callable[[str, Any], bool] | None

METHODS = ("resu", "dense", "oneshot", "gmp", "rigl")
SCHEDULES = ("linear", "cubic", "constant")
COMPILERS = ("inductor", "aot_eager", "eager")
SELECTIONS = ("random", "all", "topk", "consistency")
THETA_OPTIMIZERS = ("sgd", "momentum", "adamw")
#: ``theta_lr`` as given ("constant"), or scaled like the optimizer's own rate ("optimizer").
THETA_LR_SCHEDULES = ("constant", "optimizer")
AMNESTY_SCORES = ("magnitude", "gradient", "wanda")
NAN_POLICIES = ("skip", "raise")
GRADIENT_MASKS = ("graph", "optimizer")
#: How each method shares its sparsity among layers unless ``distribution`` says otherwise: RESU
#: one global magnitude threshold (README "Defaults from evidence"), RigL its paper's ERK, the
#: others (GMP, one-shot) the same sparsity in every layer.
DEFAULT_DISTRIBUTIONS = {"resu": "global", "rigl": "erk"}
SECTIONS = ("method", "schedule", "weights", "pruning", "resu", "amnesty", "rigl", "runtime")


@dataclass(frozen=True)
class Check:
    """What one option allows: a predicate and the words that say it in an error."""

    allowed: str
    test: Callable[[Any], bool]


def _is_number(value: Any) -> bool:
    """A finite real number (NaN and infinities are never a valid option value)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def one_of(values: Sequence[Any]) -> Check:
    return Check(f"one of {tuple(values)}", lambda v: v in values)


def number(
    low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False
) -> Check:
    """A real number from ``low`` to ``high`` (each end closed unless said open)."""
    if high == math.inf:
        words = f"a number {'>' if open_low else '>='} {low:g}"
    else:
        words = (
            f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        )

    def test(v: Any) -> bool:
        if not _is_number(v):
            return False
        above = v > low if open_low else v >= low
        return above and (v < high if open_high else v <= high)

    return Check(words, test)


def integer(at_least: int, meaning: str = "") -> Check:
    return Check(f"an integer >= {at_least}{meaning}", lambda v: _is_int(v) and v >= at_least)


BOOL = Check("a bool", lambda v: isinstance(v, bool))
INT = Check("an integer", _is_int)
OPTIONAL_POSITIVE_INT = Check(
    "a positive integer or None", lambda v: v is None or (_is_int(v) and v >= 1)
)
BETAS = Check(
    "two numbers in [0, 1)",
    lambda v: isinstance(v, tuple) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
)
FRACTIONS = Check(
    "three numbers in [0, 1] (train, stabilize, resu) summing to 1",
    lambda v: (
        isinstance(v, tuple)
        and len(v) == 3
        and all(_is_number(f) and 0 <= f <= 1 for f in v)
        and abs(sum(v) - 1.0) < 1e-6
    ),
)
CALLABLE_OR_NONE = Check("None or a callable (model, cycle)", lambda v: v is None or callable(v))
FILTER = Check(
    "a glob string, a list of globs, or a callable (name, param) -> bool",
    lambda v: (
        v is None
        or callable(v)
        or isinstance(v, str)
        or (isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v))
    ),
)


#: ``option(legacy=...)`` unset: the option is as old as the first release, or its behaviour before
#: it existed is no value of it.
NO_LEGACY = object()


def option(
    default: Any,
    section: str,
    check: Check | None,
    *,
    checkpoint: bool = False,
    scope: str | None = None,
    legacy: Any = NO_LEGACY,
) -> Any:
    """Declare an option: ``scope`` names the method or mode it applies to (None: all);
    ``checkpoint``: a checkpoint saved under another value is refused (it changes what the saved
    masks and theta mean); ``legacy``: for an option added after the first release, the value
    that does what the library did before it existed (how a recorded configuration that lacks
    it ran, see :meth:`ResuConfig.effective`)."""
    assert section in SECTIONS, section
    metadata = {"section": section, "check": check, "checkpoint": checkpoint, "scope": scope}
    return field(default=default, metadata={**metadata, "legacy": legacy})


@dataclass(frozen=True)
class ResuConfig:
    """Options of a RESU run (or of a baseline on the same compile path).

    Defaults follow METHOD.md except where the accuracy study says otherwise (README, "Defaults from
    evidence"). The README's "Options" table says what every option means and allows.
    """

    # -- method
    method: str = option("resu", "method", one_of(METHODS), checkpoint=True)
    # -- schedule
    sparsity: float = option(0.7, "schedule", number(0, 1, open_high=True), checkpoint=True)
    cycles: int = option(5, "schedule", integer(1), checkpoint=True)
    steps_per_cycle: int | None = option(None, "schedule", OPTIONAL_POSITIVE_INT)
    total_steps: int | None = option(None, "schedule", OPTIONAL_POSITIVE_INT)
    phase_fractions: tuple[float, float, float] = option((0.6, 0.1, 0.3), "schedule", FRACTIONS)
    schedule: str | tuple[float, ...] | None = option(None, "schedule", None, checkpoint=True)
    pause_after: tuple[int, ...] = option((), "schedule", None, checkpoint=True)
    on_pause: Callable[[Any, int], None] | None = option(None, "schedule", CALLABLE_OR_NONE)
    manual: bool = option(False, "schedule", BOOL, scope="resu")
    # -- which weights
    include: ParamFilter = option(None, "weights", FILTER)
    exclude: ParamFilter = option(None, "weights", FILTER)
    # -- pruning
    criterion: str = option("magnitude", "pruning", one_of(CRITERIA), checkpoint=True)
    distribution: str | None = option(None, "pruning", one_of(DISTRIBUTIONS), checkpoint=True)
    pattern: str | None = option(None, "pruning", None, checkpoint=True)
    transposable: bool = option(
        False, "pruning", BOOL, checkpoint=True, scope="pattern", legacy=False
    )
    # -- the RESU phase
    selection: str = option("random", "resu", one_of(SELECTIONS), checkpoint=True, scope="resu")
    alpha: float = option(0.2, "resu", number(0, 1, open_low=True), checkpoint=True, scope="resu")
    refresh: int = option(
        0,
        "resu",
        integer(0, " (RESU steps between topk re-selections; 0: never)"),
        checkpoint=True,
        scope="selection=topk",
    )
    screen_fraction: float = option(
        0.5, "resu", number(0, 1), checkpoint=True, scope="selection=consistency"
    )
    consistency_tau: float = option(
        0.5, "resu", number(0, 1), checkpoint=True, scope="selection=consistency"
    )
    consistency_beta: float = option(
        0.9, "resu", number(0, 1, open_high=True), checkpoint=True, scope="selection=consistency"
    )
    freeze_active: bool = option(False, "resu", BOOL, checkpoint=True, scope="resu")
    freeze_others: bool = option(False, "resu", BOOL, scope="resu")
    theta_optimizer: str = option(
        "adamw", "resu", one_of(THETA_OPTIMIZERS), checkpoint=True, scope="resu"
    )
    theta_lr: float = option(1e-3, "resu", number(0, math.inf, open_low=True), scope="resu")
    theta_lr_schedule: str = option(
        "optimizer",
        "resu",
        one_of(THETA_LR_SCHEDULES),
        checkpoint=True,
        scope="resu",
        legacy="constant",
    )
    theta_betas: tuple[float, float] = option((0.9, 0.999), "resu", BETAS, scope="resu")
    theta_weight_decay: float = option(0.0, "resu", number(0), scope="resu")
    theta_init_eps: float = option(0.1, "resu", number(0), scope="resu")
    # -- the commit's amnesty
    amnesty: bool = option(True, "amnesty", BOOL, checkpoint=True, scope="resu")
    amnesty_score: str = option(
        "magnitude", "amnesty", one_of(AMNESTY_SCORES), checkpoint=True, scope="resu"
    )
    r_start: float = option(0.10, "amnesty", number(0, 1), checkpoint=True, scope="resu")
    r_end: float = option(0.02, "amnesty", number(0, 1), checkpoint=True, scope="resu")
    carry_theta_state: bool = option(False, "amnesty", BOOL, checkpoint=True, scope="resu")
    # -- RigL
    rigl_interval: int = option(100, "rigl", integer(1), checkpoint=True, scope="rigl")
    rigl_fraction: float = option(0.3, "rigl", number(0, 1), checkpoint=True, scope="rigl")
    rigl_end: float = option(0.75, "rigl", number(0, 1), checkpoint=True, scope="rigl")
    # -- runtime
    seed: int = option(0, "runtime", INT)
    nan_policy: str = option("skip", "runtime", one_of(NAN_POLICIES))
    compiler: str = option("inductor", "runtime", one_of(COMPILERS))
    gradient_mask: str = option("optimizer", "runtime", one_of(GRADIENT_MASKS))
    semi_sparse: bool = option(False, "runtime", BOOL, scope="pattern='2:4'", legacy=False)

    def __post_init__(self) -> None:
        for name in ("schedule", "pause_after", "phase_fractions", "theta_betas"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.schedule is None:  # README "Defaults from evidence": cubic for every method
            object.__setattr__(self, "schedule", "constant" if self.pattern else "cubic")
        if self.distribution is None:
            default = DEFAULT_DISTRIBUTIONS.get(self.method, "uniform")
            object.__setattr__(self, "distribution", default)
        for f in dataclasses.fields(self):
            check = f.metadata["check"]
            value = getattr(self, f.name)
            if check is not None and not check.test(value):
                _fail(f.name, check.allowed, value)
        self._validate_together()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **kwargs: Any) -> ResuConfig:
        """Build from a dict (``torch.compile(..., options=...)``) and/or keyword arguments.

        Unknown names raise ``ValueError`` listing the allowed ones.
        """
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(
                f"ResuConfig: options must be a dict of option names to values, got "
                f"{type(options).__name__}"
            )
        merged: dict[str, Any] = dict(options or {})
        merged.update(kwargs)
        allowed = cls.option_names()
        unknown = sorted(set(merged) - set(allowed))
        if unknown:
            raise ValueError(
                f"ResuConfig: unknown option(s) {unknown}; allowed options: {', '.join(allowed)}"
            )
        return cls(**merged)

    @classmethod
    def option_names(cls, section: str | None = None) -> list[str]:
        """Every option's name (of one section, if given), in declaration order."""
        return [
            f.name
            for f in dataclasses.fields(cls)
            if section is None or f.metadata["section"] == section
        ]

    @classmethod
    def checkpoint_options(cls) -> list[str]:
        """The options a checkpoint must match to be loaded."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata["checkpoint"]]

    def to_dict(self) -> dict[str, Any]:
        """Serialisable view (callable filters are recorded by their repr only)."""
        out: dict[str, Any] = {}
        for name in self.option_names():
            value = getattr(self, name)
            if callable(value):
                value = f"<callable {getattr(value, '__qualname__', repr(value))}>"
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out

    @classmethod
    def with_legacy(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` (a :meth:`to_dict` of this or an earlier version) with every option it
        lacks that has a ``legacy`` value set to it: what a run recorded before the option
        existed ran under."""
        legacy = {f.name: f.metadata["legacy"] for f in dataclasses.fields(cls)}
        return {
            **{name: value for name, value in legacy.items() if value is not NO_LEGACY},
            **options,
        }

    @classmethod
    def effective(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` (a :meth:`to_dict`, possibly of an earlier version: an option it lacks takes
        its ``legacy`` value) without those whose scope excludes them: what can change a run.

        A theta option does not change a GMP run, nor a consistency threshold a random-selection
        one, so runs that differ only in such options are the same run (a moved RESU default
        leaves the baselines' results valid)."""
        options = cls.with_legacy(options)
        scopes = {f.name: f.metadata["scope"] for f in dataclasses.fields(cls)}

        def applies(name: str) -> bool:
            scope = scopes.get(name)
            if scope is None:
                return True
            key, equals, value = scope.partition("=")
            if equals:  # another option at one value, e.g. selection=topk
                return applies(key) and str(options.get(key)) == value.strip("'")
            if key in scopes:  # another option set at all, e.g. pattern
                return options.get(key) is not None
            return options.get("method") == key  # a method, e.g. resu

        return {name: value for name, value in options.items() if applies(name)}

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

    # -- rules across options -----------------------------------------------------------------

    def _validate_together(self) -> None:
        if self.steps_per_cycle is not None and self.total_steps is not None:
            raise ValueError("ResuConfig: give at most one of 'steps_per_cycle' and 'total_steps'")
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
            self.phase_fractions,
        )
        if isinstance(self.schedule, tuple):
            _require(
                len(self.schedule) == self.cycles
                and all(_is_number(s) and 0 <= s < 1 for s in self.schedule),
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
        self._validate_pattern()

    def _validate_pattern(self) -> None:
        _require(
            not self.transposable or self.pattern is not None,
            "transposable",
            "False unless a 'pattern' is given (it makes the pattern hold in both directions)",
            self.transposable,
        )
        _require(
            not self.semi_sparse or self.pattern == "2:4",
            "semi_sparse",
            "False unless pattern is '2:4' (the sparse tensor cores' pattern)",
            self.semi_sparse,
        )
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
        _require(
            not self.transposable or m <= 4,
            "transposable",
            f"False with pattern {self.pattern!r} (transposable patterns are searched exactly, "
            "for M <= 4)",
            self.transposable,
        )


def _fail(option: str, allowed: str, value: Any) -> None:
    raise ValueError(f"ResuConfig: option '{option}' must be {allowed}, got {value!r}")


def _require(condition: bool, option: str, allowed: str, value: Any) -> None:
    if not condition:
        _fail(option, allowed, value)


def _matches(pattern: ParamFilter, name: str, param: Any) -> bool:
    if callable(pattern):
        return bool(pattern(name, param))
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or ())
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
