"""Plot a run's history: per-layer sparsity and resurrected weights per cycle, as a PNG.

Usage (``resu-quickstart --plot FILE`` draws the same figure at the end of its run):

    python -m resu_examples.plot_history HISTORY.json [--out plot.png]

``HISTORY.json`` holds either the history list (``model.resu.history``) or a dict with a
``"history"`` key (e.g. ``model.resu.state_dict()`` written as JSON, or the ``--json`` output of
``resu-quickstart``, whose ``"curves"`` add the training-loss panel). The first panel is each
layer's actual sparsity at the end of each cycle; the second the weights resurrected at each
commit, per layer and in total. A run without commits (GMP, RigL) shows RigL's regrown weights
instead, or says that nothing was resurrected. Needs matplotlib: ``pip install matplotlib``
(the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resu_compile.views.telemetry import counts_by_cycle, history_from, sparsity_by_cycle

# Beyond this many layers a legend hides the plot; the title gives the count instead.
MAX_LEGEND = 12


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend; a clear exit when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "plotting needs matplotlib, which is not installed: pip install matplotlib "
            '(or pip install "resu-compile[plot]"; pip install -e ".[plot]" in a checkout)'
        ) from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_history(
    history: list[dict[str, Any]],
    out: Path,
    title: str | None = None,
    curves: Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> Path:
    """Draw the panels of ``history`` and save them to ``out`` (PNG); returns ``out``.

    ``curves`` (run name -> ``(step, loss)`` pairs) adds a third panel, the training loss.
    """
    plt = require_matplotlib()
    sparsity = sparsity_by_cycle(history)
    counts = counts_by_cycle(history, "commit", "resurrected")
    count_label = "resurrected weights"
    if not counts:
        counts = counts_by_cycle(history, "rigl", "grown")
        count_label = "regrown weights (RigL)"

    panels = 3 if curves else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), constrained_layout=True)
    left, right = axes[0], axes[1]
    for name, per_cycle in sparsity.items():
        cycles = sorted(per_cycle)
        left.plot(cycles, [per_cycle[c] for c in cycles], marker="o", label=name)
    targets = {
        entry["cycle"]: entry["target"]
        for entry in history
        if entry.get("event") == "prune"
        and isinstance(entry.get("cycle"), int)
        and isinstance(entry.get("target"), (int, float))
    }
    if targets:
        cycles = sorted(targets)
        left.plot(cycles, [targets[c] for c in cycles], color="gray", linestyle=":", label="target")
    left.set(xlabel="cycle", ylabel="actual sparsity", title="Sparsity per layer")
    _legend(left, len(sparsity) + bool(targets))

    if counts:
        totals: dict[int, int] = {}
        for name, per_cycle in counts.items():
            cycles = sorted(per_cycle)
            right.plot(cycles, [per_cycle[c] for c in cycles], marker="o", label=name)
            for cycle, value in per_cycle.items():
                totals[cycle] = totals.get(cycle, 0) + value
        cycles = sorted(totals)
        right.plot(
            cycles,
            [totals[c] for c in cycles],
            color="black",
            linestyle="--",
            marker="s",
            linewidth=2,
            label="total",
        )
        _legend(right, len(counts) + 1)
    else:
        right.text(0.5, 0.5, "no commits or RigL updates", ha="center", va="center")
    right.set(xlabel="cycle", ylabel=count_label, title=count_label.capitalize() + " per cycle")
    for axis in (left, right):
        axis.xaxis.get_major_locator().set_params(integer=True)
    if curves:
        _plot_curves(axes[2], curves)
    for axis in axes:
        axis.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    plt.close(fig)
    return out


def _plot_curves(axis: Any, curves: Mapping[str, Sequence[Sequence[float]]]) -> None:
    for name, points in curves.items():
        axis.plot([p[0] for p in points], [p[1] for p in points], label=name, linewidth=1)
    axis.set(xlabel="optimizer step", ylabel="training loss (one batch)", title="Training loss")
    _legend(axis, len(curves))


def _legend(axis: Any, entries: int) -> None:
    if 0 < entries <= MAX_LEGEND:
        axis.legend(fontsize="small")
    elif entries > MAX_LEGEND:
        axis.set_title(f"{axis.get_title()} ({entries} series, legend omitted)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("history", type=Path, help="JSON: a history list or a dict with 'history'")
    parser.add_argument("--out", type=Path, help="PNG to write (default: HISTORY with .png)")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.history.read_text())
        history = history_from(data)
    except (OSError, json.JSONDecodeError, ValueError) as error:
        parser.error(f"{args.history}: {error}")
    curves = data.get("curves") if isinstance(data, Mapping) else None
    out = args.out if args.out is not None else args.history.with_suffix(".png")
    plot_history(history, out, title=args.history.name, curves=curves)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
