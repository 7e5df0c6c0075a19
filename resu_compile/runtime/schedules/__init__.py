"""One schedule object per method, registered by name (``method=`` picks one).

A schedule only decides *when*: given where the run stands, the transition that is due. The
controller runs it. A new method is a subclass of :class:`Schedule` registered with
:func:`register_schedule`.
"""

from resu_compile.runtime.schedules.base import Schedule, register_schedule, schedule_for
from resu_compile.runtime.schedules.dense import DenseSchedule
from resu_compile.runtime.schedules.gmp import GmpSchedule
from resu_compile.runtime.schedules.oneshot import OneShotSchedule
from resu_compile.runtime.schedules.resu import ResuSchedule
from resu_compile.runtime.schedules.rigl import RiglSchedule

__all__ = [
    "DenseSchedule",
    "GmpSchedule",
    "OneShotSchedule",
    "ResuSchedule",
    "RiglSchedule",
    "Schedule",
    "register_schedule",
    "schedule_for",
]
