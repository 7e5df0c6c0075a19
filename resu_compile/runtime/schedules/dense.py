"""``method="dense"``: the reference run; never prunes."""

from __future__ import annotations

from resu_compile.runtime.schedules.base import Schedule, register_schedule


@register_schedule("dense")
class DenseSchedule(Schedule):
    def prunes_in(self, cycle: int) -> bool:
        return False
