"""``method="oneshot"``: one prune to the final sparsity at the end of cycle 0's TRAIN share, then
masked fine-tuning."""

from __future__ import annotations

from resu_compile.runtime.schedules.base import Schedule, register_schedule


@register_schedule("oneshot")
class OneShotSchedule(Schedule):
    def prunes_in(self, cycle: int) -> bool:
        return cycle == 0

    def prune_target(self, cycle: int) -> float:
        return self.config.sparsity
