"""``method="rigl"``: RigL (Evci et al.). A random mask at the final sparsity before the first
step; every ``rigl_interval`` steps drop the smallest ``|W|`` and grow the largest dense ``|G|``,
the fraction decaying by cosine until ``rigl_end`` of the schedule."""

from __future__ import annotations

from resu_compile.method.rigl import rigl_fraction
from resu_compile.runtime.phase import Phase, Progress, Transition
from resu_compile.runtime.schedules.base import Schedule, register_schedule


@register_schedule("rigl")
class RiglSchedule(Schedule):
    def prunes_in(self, cycle: int) -> bool:
        return False

    def due(self, progress: Progress) -> Transition | None:
        if not progress.pruned and progress.phase not in (Phase.DONE, Phase.PAUSED):
            return Transition("prune", self.config.sparsity, "random")
        return super().due(progress)

    @property
    def end_step(self) -> int:
        """The step after which masks stop changing."""
        return int(self.config.rigl_end * self.config.run_steps)

    def updates_masks_after(self, step: int, progress: Progress) -> bool:
        return (
            progress.pruned
            and progress.phase is not Phase.PAUSED
            and step % self.config.rigl_interval == 0
            and 0 < step < self.end_step
        )

    def fraction(self, step: int) -> float:
        """The share of actives dropped and regrown at ``step`` (cosine decay)."""
        return rigl_fraction(step, self.end_step, self.config.rigl_fraction)
