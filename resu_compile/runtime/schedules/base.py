"""The schedule interface and its registry."""

from __future__ import annotations

from collections.abc import Callable

from resu_compile.config import ResuConfig
from resu_compile.method.schedule import cycle_sparsities
from resu_compile.runtime.phase import Phase, Progress, Transition

_REGISTRY: dict[str, type[Schedule]] = {}


def register_schedule(method: str) -> Callable[[type[Schedule]], type[Schedule]]:
    """Class decorator: the schedule of ``method=...``."""

    def register(cls: type[Schedule]) -> type[Schedule]:
        _REGISTRY[method] = cls
        return cls

    return register


def schedule_for(config: ResuConfig) -> Schedule:
    """The schedule of ``config.method``."""
    return _REGISTRY[config.method](config)


class Schedule:
    """When a method's transitions happen, in optimizer steps (METHOD.md section 2).

    Every method runs ``cycles`` cycles of ``cycle_length`` steps; the default cycle prunes once,
    after its TRAIN share (``prunes_in`` says in which cycles), and ends at its last step.
    """

    def __init__(self, config: ResuConfig) -> None:
        self.config = config
        self.sparsities = cycle_sparsities(config.sparsity, config.cycles, config.schedule)

    def target(self, cycle: int) -> float:
        """Target sparsity of ``cycle`` (the final target once the schedule is done)."""
        return self.sparsities[min(cycle, self.config.cycles - 1)]

    def prunes_in(self, cycle: int) -> bool:
        return True

    def prune_target(self, cycle: int) -> float:
        return self.target(cycle)

    def due(self, progress: Progress) -> Transition | None:
        """The transition the run has reached, if any."""
        if progress.phase in (Phase.DONE, Phase.PAUSED):
            return None
        into_cycle = self.into_cycle(progress)
        train, _, _ = self.config.phase_steps
        if progress.phase is Phase.TRAIN and into_cycle >= train and self.prunes_in(progress.cycle):
            return Transition("prune", self.prune_target(progress.cycle), self.config.criterion)
        return self.after_train(progress, into_cycle)

    def after_train(self, progress: Progress, into_cycle: int) -> Transition | None:
        """What is due once the cycle's prune (if any) is done: the cycle's end by default."""
        return Transition("end_cycle") if into_cycle >= self.config.cycle_length else None

    def into_cycle(self, progress: Progress) -> int:
        return progress.step - progress.cycle * self.config.cycle_length

    def updates_masks_after(self, step: int, progress: Progress) -> bool:
        """Whether the masks change once optimizer step ``step`` is done (RigL's drop / grow)."""
        return False
