"""Draw an accuracy result's validation traces: one figure per task, one panel per sparsity.

Each panel shows, per method, the held-out metric (on the trace's fixed subset) against the
optimizer step: the mean over seeds as a thick line, every seed as a thin one, and the points
right after a transition marked by their kind (prune, RESU entry, commit, RigL update), so a
collapse after a prune shows at a glance. Dense appears in every panel; ``pruned-no-recovery``
(no trace of its own) is a dotted level.

``benchmarks/accuracy.py`` calls it at the end of a task, and for an existing result:

    python -m benchmarks.accuracy --plot-only benchmarks/results/accuracy-TASK.json

matplotlib is the ``plot`` extra (``pip install -e ".[plot]"``), imported only when drawing.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Marker per transition kind (a point after several transitions takes the first one's).
MARKERS = {"prune": "v", "resu": "^", "commit": "o", "rigl": ".", "before-final-prune": "x"}
NO_RECOVERY = "pruned-no-recovery"


def mean_trace(records: Sequence[dict[str, Any]]) -> list[tuple[int, float, str]]:
    """(step, mean metric, event) at the steps every seed's trace has, in step order."""
    per_step: dict[int, list[float]] = {}
    events: dict[int, str] = {}
    for record in records:
        for point in record["trace"]:
            per_step.setdefault(point["step"], []).append(point["metric"])
            events.setdefault(point["step"], point["event"])
    return [
        (step, statistics.fmean(values), events[step])
        for step, values in sorted(per_step.items())
        if len(values) == len(records)
    ]


def _limits(values: Sequence[float], higher_is_better: bool) -> tuple[float, float] | None:
    """Y range that keeps the trained part readable: the untrained start (and a collapse far
    beyond the others) would otherwise flatten every curve."""
    if not values:
        return None
    ordered = sorted(values)
    low = ordered[int(0.02 * (len(ordered) - 1))] if higher_is_better else ordered[0]
    high = ordered[-1] if higher_is_better else ordered[int(0.98 * (len(ordered) - 1))]
    margin = 0.08 * (high - low) or 0.05 * abs(high) or 1.0
    return low - margin, high + margin


def plot_result(result: dict[str, Any], path: Path) -> Path:
    """Write the figure of ``result`` (an ``accuracy-<task>.json`` dict) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r.get("trace")]
    sparsities = sorted({r["sparsity"] for r in runs if r["sparsity"] is not None}) or [None]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    figure, axes = plt.subplots(
        1, len(sparsities), figsize=(6.5 * len(sparsities), 5.2), squeeze=False, sharey=True
    )
    higher = result.get("higher_is_better", True)
    late = 0.1 * result["steps"]  # points kept for the y range: after the first 10% of steps
    shown: list[float] = []
    for axis, sparsity in zip(axes[0], sparsities, strict=True):
        for method in methods:
            chosen = [
                r for r in runs if r["method"] == method and r["sparsity"] in (None, sparsity)
            ]
            if not chosen:
                continue
            colour = colours[method]
            for record in chosen:
                trace = record["trace"]
                axis.plot(
                    [p["step"] for p in trace],
                    [p["metric"] for p in trace],
                    color=colour,
                    linewidth=0.5,
                    alpha=0.35,
                )
            mean = mean_trace(chosen)
            axis.plot([p[0] for p in mean], [p[1] for p in mean], color=colour, label=method)
            shown += [metric for step, metric, _ in mean if step >= late]
            for kind, marker in MARKERS.items():
                marked = [(s, m) for s, m, event in mean if event.split("+")[0] == kind]
                if marked:
                    axis.scatter(*zip(*marked, strict=True), color=colour, marker=marker, s=18)
        levels = [
            row
            for row in result.get("summary", [])
            if row["method"] == NO_RECOVERY and row["sparsity"] == sparsity
        ]
        for row in levels:
            axis.axhline(row["mean"], color="grey", linestyle=":", label=NO_RECOVERY)
            shown.append(row["mean"])
        title = result["task"] if sparsity is None else f"{result['task']}, sparsity {sparsity:.0%}"
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{result['metric']} (trace subset)")
    limits = _limits(shown, higher)
    if limits is not None:
        axes[0][0].set_ylim(*limits)
    # One legend for the methods, one for the transition markers.
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    columns = min(len(unique), 3 * len(sparsities))
    figure.legend(
        unique.values(), unique.keys(), loc="upper center", ncol=columns, fontsize="small"
    )
    kinds = [
        plt.Line2D([], [], color="black", marker=marker, linestyle="", label=kind)
        for kind, marker in MARKERS.items()
    ]
    axes[0][-1].legend(handles=kinds, loc="best", fontsize="small", title="trace points")
    rows = -(-len(unique) // columns)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.06 * rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
