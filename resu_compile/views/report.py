"""Human-readable tables of what the pass manages and what the schedule did (tabulate)."""

from __future__ import annotations

from tabulate import tabulate

from resu_compile.state import StateManager


def render_report(header: str, state: StateManager, totals: str | None) -> str:
    """Managed weights, skipped candidates and the schedule's model totals (``totals``, already
    rendered, or None before the first transition), as plain-text tables under ``header``."""
    skipped = [[s.name, "x".join(map(str, s.shape)), s.reason] for s in state.skipped()]
    managed = [
        [
            w.name,
            "x".join(map(str, w.shape)),
            ", ".join(sorted(set(w.ops))) or "-",
            f"{w.sparsity():.4f}",
            w.active_count(),
        ]
        for w in state
    ]
    headers = ["name", "shape", "ops", "sparsity", "active"]
    if any(w.semi_sparse_products is not None for w in state):
        headers.append("2:4 phases' products")
        for row, w in zip(managed, state, strict=True):
            row.append(w.semi_sparse_products or "-")
    parts = [
        header,
        "Managed weights:",
        tabulate(managed, headers=headers, disable_numparse=True)
        if managed
        else "  (none: every weight seen was skipped, reasons below)"
        if skipped
        else "  (none yet: run a forward pass)",
    ]
    if skipped:
        parts += ["Skipped candidates:", tabulate(skipped, headers=["name", "shape", "reason"])]
    if totals is not None:
        parts += ["Schedule so far (model totals; per layer: model.resu.telemetry()):", totals]
    return "\n".join(parts)
