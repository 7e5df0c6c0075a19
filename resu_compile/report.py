"""Human-readable tables of what the pass manages and what the schedule did (tabulate)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tabulate import tabulate

if TYPE_CHECKING:
    from resu_compile.phases import PhaseController


def render_report(controller: PhaseController) -> str:
    """Managed weights, skipped candidates and the schedule's model totals, as plain-text tables."""
    skipped = [[s.name, "x".join(map(str, s.shape)), s.reason] for s in controller.state.skipped()]
    managed = [
        [
            w.name,
            "x".join(map(str, w.shape)),
            ", ".join(sorted(set(w.ops))) or "-",
            f"{w.sparsity():.4f}",
            w.active_count(),
        ]
        for w in controller.state
    ]
    parts = [
        f"phase={controller.phase.value} cycle={controller.cycle}/{controller.config.cycles} "
        f"step={controller.step_count} target={controller.current_target():.4f}",
        "Managed weights:",
        tabulate(
            managed, headers=["name", "shape", "ops", "sparsity", "active"], disable_numparse=True
        )
        if managed
        else "  (none: every weight seen was skipped, reasons below)"
        if skipped
        else "  (none yet: run a forward pass)",
    ]
    if skipped:
        parts += ["Skipped candidates:", tabulate(skipped, headers=["name", "shape", "reason"])]
    if controller.history:
        parts += [
            "Schedule so far (model totals; per layer: model.resu.telemetry()):",
            controller.telemetry(totals_only=True),
        ]
    return "\n".join(parts)
