"""Human-readable tables of what the pass manages and what the schedule did (tabulate)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tabulate import tabulate

if TYPE_CHECKING:
    from resu_compile.phases import PhaseController


def render_report(controller: PhaseController) -> str:
    """Managed weights, skipped candidates and per-cycle resurrection, as plain-text tables."""
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
        else "  (none yet: run a forward pass)",
    ]
    skipped = [[s.name, "x".join(map(str, s.shape)), s.reason] for s in controller.state.skipped()]
    if skipped:
        parts += ["Skipped candidates:", tabulate(skipped, headers=["name", "shape", "reason"])]
    commits = [e for e in controller.history if e["event"] == "commit"]
    if commits:
        rows = [
            [
                entry["cycle"],
                entry["step"],
                f"{entry['budget']:.3f}",
                sum(layer["resurrected"] for layer in entry["layers"].values()),
                f"{_mean(layer['sparsity'] for layer in entry['layers'].values()):.4f}",
            ]
            for entry in commits
        ]
        parts += [
            "Commits:",
            tabulate(
                rows, headers=["cycle", "step", "budget r(c)", "resurrected", "mean sparsity"]
            ),
        ]
    return "\n".join(parts)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
