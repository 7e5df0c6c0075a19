"""``method="resu"``: TRAIN, PRUNE, STABILIZE, RESU, COMMIT in every cycle (METHOD.md section 2)."""

from __future__ import annotations

from resu_compile.runtime.phase import Phase, Progress, Transition
from resu_compile.runtime.schedules.base import Schedule, register_schedule


@register_schedule("resu")
class ResuSchedule(Schedule):
    def after_train(self, progress: Progress, into_cycle: int) -> Transition | None:
        train, stabilize, _ = self.config.phase_steps
        if progress.phase is Phase.STABILIZE and into_cycle >= train + stabilize:
            return Transition("enter_resu")
        if progress.phase is Phase.RESU and into_cycle >= self.config.cycle_length:
            return Transition("commit")
        return None
