"""Per-cycle target sparsities and amnesty budgets (METHOD.md sections 2 and 5)."""

from __future__ import annotations

from collections.abc import Sequence


def cycle_sparsities(target: float, cycles: int, schedule: str | Sequence[float]) -> list[float]:
    """Target sparsity ``s_c`` of every cycle ``c = 0 .. cycles - 1``.

    - ``linear``: ``s * (c + 1) / C``, so cycle 0 already prunes and the last reaches ``s``.
    - ``cubic``: Zhu & Gupta, ``s * (1 - (1 - (c + 1) / C) ** 3)``.
    - ``constant``: ``s`` in every cycle.
    - an explicit sequence: used as given (a decreasing one densifies).
    """
    if not isinstance(schedule, str):
        if len(schedule) != cycles:
            raise ValueError(f"schedule: expected {cycles} sparsities, got {len(schedule)}")
        return [float(s) for s in schedule]
    if schedule == "linear":
        return [target * (c + 1) / cycles for c in range(cycles)]
    if schedule == "cubic":
        return [target * (1.0 - (1.0 - (c + 1) / cycles) ** 3) for c in range(cycles)]
    if schedule == "constant":
        return [float(target)] * cycles
    raise ValueError(f"schedule: unknown schedule {schedule!r}")


def amnesty_budget(cycle: int, cycles: int, r_start: float, r_end: float) -> float:
    """``r(c) = r_start - (r_start - r_end) * c / (C - 1)``; a single cycle uses ``r_end``."""
    if cycles == 1:
        return r_end
    return r_start - (r_start - r_end) * cycle / (cycles - 1)


def keep_count(numel: int, sparsity: float) -> int:
    """Number of active coordinates at ``sparsity``: exactly ``int((1 - s) * N)``."""
    return int((1.0 - sparsity) * numel)
