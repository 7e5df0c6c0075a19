"""The steady phases of a run, and where a run stands."""

from __future__ import annotations

import enum
from dataclasses import dataclass


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


@dataclass(frozen=True)
class Progress:
    """Where the run stands, as the schedules read it."""

    phase: Phase
    cycle: int
    step: int  # optimizer steps taken by the schedule (paused steps do not count)
    pruned: bool  # masks exist


@dataclass(frozen=True)
class Transition:
    """A transition a schedule asks for: ``kind`` is "prune", "enter_resu", "commit",
    "end_cycle" or "rigl_update"; a prune names its target and criterion."""

    kind: str
    sparsity: float | None = None
    criterion: str | None = None
