"""Plot a run's history: per-layer sparsity and resurrected weights per cycle, as a PNG.

Usage:

    python benchmarks/plot_history.py HISTORY.json [--out plot.png]

``HISTORY.json`` holds either the history list (``model.resu.history``) or a dict with a
``"history"`` key (e.g. ``model.resu.state_dict()`` written as JSON). The left panel is each
layer's actual sparsity at the end of each cycle; the right one the weights resurrected at each
commit, per layer and in total. A run without commits (GMP, RigL) shows RigL's regrown weights
instead, or says that nothing was resurrected. Needs matplotlib: ``pip install -e ".[plot]"``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _load_telemetry() -> ModuleType:
    """``resu_compile/views/telemetry.py`` loaded by path, not through the package.

    The package's ``__init__`` imports torch (seconds to load, and not needed to read a JSON
    file); telemetry itself needs only tabulate. Loading by path also works from any directory
    without installing the package.
    """
    spec = importlib.util.spec_from_file_location(
        "_resu_telemetry", ROOT / "resu_compile" / "views" / "telemetry.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_telemetry = _load_telemetry()
counts_by_cycle = _telemetry.counts_by_cycle
history_from = _telemetry.history_from
sparsity_by_cycle = _telemetry.sparsity_by_cycle

# Beyond this many layers a legend hides the plot; the title gives the count instead.
MAX_LEGEND = 12


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            'plot_history: matplotlib is not installed; install it with pip install -e ".[plot]" '
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict[str, Any]], out: Path, title: str | None = None) -> Path:
    """Draw the two panels of ``history`` and save them to ``out`` (PNG); returns ``out``."""
    plt = _pyplot()
    sparsity = sparsity_by_cycle(history)
    counts = counts_by_cycle(history, "commit", "resurrected")
    count_label = "resurrected weights"
    if not counts:
        counts = counts_by_cycle(history, "rigl", "grown")
        count_label = "regrown weights (RigL)"

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
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
        axis.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    plt.close(fig)
    return out


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
        history = history_from(json.loads(args.history.read_text()))
    except (OSError, json.JSONDecodeError, ValueError) as error:
        parser.error(f"{args.history}: {error}")
    out = args.out if args.out is not None else args.history.with_suffix(".png")
    plot_history(history, out, title=args.history.name)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
