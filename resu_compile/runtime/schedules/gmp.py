"""``method="gmp"``: gradual magnitude pruning (Zhu & Gupta), a prune per cycle on the schedule
(cubic by default), masks only shrink, no RESU phase."""

from __future__ import annotations

from resu_compile.runtime.schedules.base import Schedule, register_schedule


@register_schedule("gmp")
class GmpSchedule(Schedule):
    """Every cycle prunes once (the base schedule's default)."""
