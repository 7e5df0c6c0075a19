"""Tables and series over a run's history (``model.resu.history``), the numbers of METHOD.md §6.

Everything here is a pure function over the history list (the JSON-serialisable list of event
dicts the controller records), so it works on a live controller, on ``controller.state_dict()``
loaded back from a checkpoint, and on a history saved as JSON, without torch.

History entries carry ``event``, ``cycle`` and ``step``; the per-layer numbers sit under
``layers``:

- ``prune``:  ``{"target": s, "layers": {name: actual_sparsity}}``
- ``resu``:   ``{"layers": {name: selected_count}}``
- ``commit``: ``{"budget": r, "layers": {name: {"target", "sparsity", "resurrected",
  "resurrected_trained", "resurrection_rate", "churn", "budget", "survivors", "reserved",
  "pruned_before"}}}``
- ``rigl``:   ``{"fraction": f, "layers": {name: {"dropped", "grown", "sparsity"}}}``
- ``pause``:  no extra keys.

Histories written by older versions lack some commit keys (``survivors``, ``reserved``,
``pruned_before``). A missing number is unknown, not zero: it is ``None`` in the rows and ``-`` in
the tables, and any total that would need it is unknown too (a partial sum would read as a
smaller true value).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tabulate import tabulate

TOTAL = "(total)"

# (row key, header, format) of the model totals, one row per commit, in column order.
TOTALS_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("cycle", "cycle", "d"),
    ("step", "step", "d"),
    ("budget", "budget", ".4f"),
    ("target", "target", ".4f"),
    ("sparsity", "sparsity", ".4f"),
    ("reserved", "reserved", "d"),
    ("resurrected", "resurrected", "d"),
    ("resurrected_trained", "trained", "d"),
    ("resurrection_rate", "resurrection rate", ".4f"),
    ("churn", "churn", "d"),
    ("survivors", "survivors", "d"),
)

# The per-layer detail: the same numbers per layer; step and budget are the commit's, in the totals.
LAYER_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("cycle", "cycle", "d"),
    ("layer", "layer", "s"),
    *(column for column in TOTALS_COLUMNS if column[0] not in ("cycle", "step", "budget")),
)

# (row key, header, format) of the per-cycle summary of runs without commits (GMP, RigL).
SUMMARY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("cycle", "cycle", "d"),
    ("step", "step", "d"),
    ("prunes", "prunes", "d"),
    ("target", "target", ".4f"),
    ("sparsity", "sparsity", ".4f"),
    ("rigl_updates", "rigl updates", "d"),
    ("dropped", "dropped", "d"),
    ("grown", "grown", "d"),
    ("paused", "paused", "s"),
)

# What every header means (METHOD.md sections 5 and 6), printed once under the tables that use it.
COLUMN_NOTES: dict[str, str] = {
    "cycle": "schedule cycle, from 0",
    "step": "optimizer step of the event (of the cycle's last event in a summary)",
    "layer": "managed weight",
    "budget": "amnesty budget r(c), the share of the kept weights reserved for pruned ones "
    "(r_start to r_end, linear over the cycles)",
    "target": "the schedule's sparsity s_c for the cycle",
    "sparsity": "actual pruned fraction after the commit (size-weighted over layers in totals)",
    "reserved": "n_R = int(r(c) * n_keep), the places reserved for pruned weights; a commit fills "
    "fewer only when too few trained candidates remain",
    "resurrected": "previously pruned weights active after the commit, |new A & old P|",
    "trained": "of those, how many trained as theta in the RESU phase (the others return as zeros)",
    "resurrection rate": "resurrected / |old P|, the share of the pruned set brought back",
    "churn": "|new A xor old A|, weights whose state changed; each resurrected weight takes an "
    "active one's place, so 2 x resurrected unless the commit changes the active count",
    "survivors": "weights resurrected at earlier commits still active after this one",
    "prunes": "prune events in the cycle",
    "rigl updates": "RigL mask updates in the cycle",
    "dropped": "active weights RigL removed, summed over the cycle's updates",
    "grown": "pruned weights RigL brought back, summed over the cycle's updates",
    "paused": "whether the schedule paused after the cycle",
}

_SPARSITY_EVENTS = ("prune", "commit", "rigl")


def history_from(data: Any) -> list[dict[str, Any]]:
    """The history list from a loaded JSON document.

    Accepts the history itself (a list), or a dict holding it under ``"history"``, such as
    ``controller.state_dict()`` serialised to JSON. Anything else raises ``ValueError`` with what
    was found, since a wrong file would otherwise give an empty table that looks like a run
    that did nothing.
    """
    if isinstance(data, Mapping):
        if "history" not in data:
            raise ValueError(
                f"no 'history' key in this dict (keys: {sorted(map(str, data))}); expected a "
                "history list or a dict with 'history', e.g. controller.state_dict()"
            )
        data = data["history"]
    if not isinstance(data, list) or not all(isinstance(entry, Mapping) for entry in data):
        raise ValueError(
            f"a history is a list of event dicts; got {type(data).__name__}"
            + (" with non-dict entries" if isinstance(data, list) else "")
        )
    return [dict(entry) for entry in data]


def cycle_rows(
    history: Sequence[Mapping[str, Any]],
    layer_sizes: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per (commit, layer) plus one ``(total)`` row per commit, in history order.

    Row keys: ``cycle``, ``step``, ``layer``, ``target``, ``sparsity``, ``resurrected``,
    ``resurrected_trained``, ``resurrection_rate`` (resurrected / |old P|), ``churn`` (|new A xor
    old A|), ``survivors`` (weights resurrected at earlier commits still active after this one),
    ``reserved`` (n_R, the places the amnesty tournament reserved), ``pruned_before`` (|old P|)
    and ``budget`` (the schedule's r(c)). Unknown numbers are ``None``.

    The ``(total)`` row sums the counts over layers and weights the fractions by what they are
    fractions of, so a small layer does not count as much as a large one:

    - ``resurrection_rate`` = sum resurrected / sum pruned_before (needs ``pruned_before``);
    - ``sparsity`` and ``target``: weighted by layer size when ``layer_sizes`` (name -> number of
      elements, e.g. ``{w.name: w.numel for w in model.resu.state}``) covers every layer of the
      commit, which gives the model's pruned fraction of managed weights. Without sizes the
      history alone cannot weight them, so the total is the *unweighted mean over layers*, and
      ``sparsity_weighting`` says which one it is (``"size"`` or ``"mean"``).
    """
    rows: list[dict[str, Any]] = []
    for entry in history:
        if entry.get("event") != "commit":
            continue
        layers = entry.get("layers")
        if not isinstance(layers, Mapping):
            continue
        commit_rows = []
        for name, data in layers.items():
            data = data if isinstance(data, Mapping) else {}
            commit_rows.append(
                {
                    "cycle": entry.get("cycle"),
                    "step": entry.get("step"),
                    "layer": str(name),
                    "target": data.get("target"),
                    "sparsity": data.get("sparsity"),
                    "resurrected": data.get("resurrected"),
                    "resurrected_trained": data.get("resurrected_trained"),
                    "resurrection_rate": data.get("resurrection_rate"),
                    "churn": data.get("churn"),
                    "survivors": data.get("survivors"),
                    "reserved": data.get("reserved"),
                    "pruned_before": data.get("pruned_before"),
                    "budget": data.get("budget", entry.get("budget")),
                }
            )
        if not commit_rows:
            continue
        rows += commit_rows
        rows.append(_total_row(entry, commit_rows, layer_sizes))
    return rows


def _total_row(
    entry: Mapping[str, Any],
    rows: list[dict[str, Any]],
    layer_sizes: Mapping[str, int] | None,
) -> dict[str, Any]:
    resurrected = _sum(r["resurrected"] for r in rows)
    pruned_before = _sum(r["pruned_before"] for r in rows)
    sizes = None
    if layer_sizes is not None and all(r["layer"] in layer_sizes for r in rows):
        sizes = [layer_sizes[r["layer"]] for r in rows]
    return {
        "cycle": entry.get("cycle"),
        "step": entry.get("step"),
        "layer": TOTAL,
        "target": _average([r["target"] for r in rows], sizes),
        "sparsity": _average([r["sparsity"] for r in rows], sizes),
        "sparsity_weighting": "size" if sizes is not None else "mean",
        "resurrected": resurrected,
        "resurrected_trained": _sum(r["resurrected_trained"] for r in rows),
        "resurrection_rate": _ratio(resurrected, pruned_before),
        "churn": _sum(r["churn"] for r in rows),
        "survivors": _sum(r["survivors"] for r in rows),
        "reserved": _sum(r["reserved"] for r in rows),
        "pruned_before": pruned_before,
        "budget": entry.get("budget"),
    }


def sparsity_by_cycle(history: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, float]]:
    """Actual sparsity of each layer at the end of each cycle: ``{layer: {cycle: sparsity}}``.

    Taken from the last ``prune``, ``commit`` or ``rigl`` entry of the cycle that names the layer,
    so it is the commit's sparsity in a RESU run and the latest prune / RigL update otherwise.
    """
    series: dict[str, dict[int, float]] = {}
    for entry in history:
        if entry.get("event") not in _SPARSITY_EVENTS or not isinstance(entry.get("cycle"), int):
            continue
        layers = entry.get("layers")
        if not isinstance(layers, Mapping):
            continue
        for name, data in layers.items():
            value = data.get("sparsity") if isinstance(data, Mapping) else data
            if _is_number(value):
                series.setdefault(str(name), {})[entry["cycle"]] = float(value)
    return series


def counts_by_cycle(
    history: Sequence[Mapping[str, Any]], event: str = "commit", key: str = "resurrected"
) -> dict[str, dict[int, int]]:
    """Per-layer count ``key`` of ``event`` entries summed per cycle: ``{layer: {cycle: n}}``.

    The default is the resurrected weights per commit; ``("rigl", "grown")`` gives RigL's regrown
    weights (several RigL updates in a cycle add up).
    """
    series: dict[str, dict[int, int]] = {}
    for entry in history:
        if entry.get("event") != event or not isinstance(entry.get("cycle"), int):
            continue
        layers = entry.get("layers")
        if not isinstance(layers, Mapping):
            continue
        for name, data in layers.items():
            value = data.get(key) if isinstance(data, Mapping) else None
            if _is_number(value):
                per_cycle = series.setdefault(str(name), {})
                per_cycle[entry["cycle"]] = per_cycle.get(entry["cycle"], 0) + value
    return series


def summary_rows(
    history: Sequence[Mapping[str, Any]],
    layer_sizes: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per cycle, for runs without commits (GMP, RigL) where per-commit rows are empty.

    Row keys: ``cycle``, ``step`` (of the cycle's last event), ``prunes`` (prune events),
    ``target`` (last prune target), ``sparsity`` (model sparsity at the end of the cycle, from
    :func:`sparsity_by_cycle`: size-weighted with ``layer_sizes`` covering every layer, else the
    unweighted mean over layers, as ``sparsity_weighting`` says), ``rigl_updates``, ``dropped`` and
    ``grown`` (summed over the cycle's RigL updates and layers) and ``paused`` (a pause followed
    the cycle).
    """
    cycles: dict[int, dict[str, Any]] = {}
    for entry in history:
        cycle = entry.get("cycle")
        if not isinstance(cycle, int):
            continue
        row = cycles.setdefault(
            cycle,
            {
                "cycle": cycle,
                "step": None,
                "prunes": 0,
                "target": None,
                "rigl_updates": 0,
                "dropped": 0,
                "grown": 0,
                "paused": "no",
            },
        )
        if entry.get("step") is not None:
            row["step"] = entry.get("step")
        event = entry.get("event")
        if event == "prune":
            row["prunes"] += 1
            row["target"] = entry.get("target", row["target"])
        elif event == "rigl":
            row["rigl_updates"] += 1
            layers = entry.get("layers")
            layers = layers.values() if isinstance(layers, Mapping) else []
            for data in layers:
                data = data if isinstance(data, Mapping) else {}
                for key in ("dropped", "grown"):
                    row[key] = _add(row[key], data.get(key))
        elif event == "pause":
            row["paused"] = "yes"
    sparsities = sparsity_by_cycle(history)
    rows = []
    for cycle in sorted(cycles):
        row = cycles[cycle]
        values = {name: s[cycle] for name, s in sparsities.items() if cycle in s}
        sizes = None
        if values and layer_sizes is not None and all(name in layer_sizes for name in values):
            sizes = [layer_sizes[name] for name in values]
        row["sparsity"] = _average(list(values.values()), sizes) if values else None
        row["sparsity_weighting"] = "size" if sizes is not None else "mean"
        rows.append(row)
    return rows


def render_history(
    history: Sequence[Mapping[str, Any]],
    layer_sizes: Mapping[str, int] | None = None,
    totals_only: bool = False,
) -> str:
    """The history as GitHub-markdown tables (tabulate ``"github"``), one per subject, each column
    explained once underneath.

    With commits (a RESU run): the model totals of :func:`cycle_rows`, one row per commit, then
    (unless ``totals_only``) the per-layer detail, one row per layer and commit. Without commits
    (GMP, RigL): :func:`summary_rows`, one row per cycle. A line under the tables says when total
    sparsities are unweighted means (no ``layer_sizes``).
    """
    rows = cycle_rows(history, layer_sizes)
    totals = [r for r in rows if r["layer"] == TOTAL]
    if totals:
        tables = [("Model totals, one row per commit:", TOTALS_COLUMNS, totals)]
        if not totals_only:
            layers = [r for r in rows if r["layer"] != TOTAL]
            tables.append(("Per layer, one row per layer and commit:", LAYER_COLUMNS, layers))
        averaged = f"{TOTAL} target and sparsity"
    else:
        totals = summary_rows(history, layer_sizes)
        tables = [("Per cycle:", SUMMARY_COLUMNS, totals)]
        averaged = "sparsity"
    if not totals:
        return "(no history yet)"
    parts = [f"{title}\n{_table(columns, table_rows)}" for title, columns, table_rows in tables]
    parts.append(_legend(columns for _, columns, _ in tables))
    if any(r.get("sparsity_weighting") == "mean" for r in totals):
        parts.append(
            f"{averaged}: unweighted mean over layers (pass layer_sizes to weight by layer size)"
        )
    return "\n\n".join(parts)


def _table(columns: Sequence[tuple[str, str, str]], rows: Sequence[Mapping[str, Any]]) -> str:
    return tabulate(
        [[_format(row.get(key), fmt) for key, _, fmt in columns] for row in rows],
        headers=[header for _, header, _ in columns],
        tablefmt="github",
        disable_numparse=True,
        colalign=["left" if fmt == "s" else "right" for _, _, fmt in columns],
    )


def _legend(tables: Iterable[Sequence[tuple[str, str, str]]]) -> str:
    """One line per header of ``tables``, in first-use order, each header explained once."""
    headers = dict.fromkeys(header for columns in tables for _, header, _ in columns)
    return "\n".join(
        textwrap.fill(f"- {header}: {COLUMN_NOTES[header]}", width=100, subsequent_indent="  ")
        for header in headers
    )


# -- helpers --------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sum(values: Iterable[Any]) -> float | int | None:
    """Sum of the values, or ``None`` if any is unknown."""
    total: float | int = 0
    for value in values:
        if not _is_number(value):
            return None
        total += value
    return total


def _add(total: float | int | None, value: Any) -> float | int | None:
    return total + value if total is not None and _is_number(value) else None


def _ratio(numerator: Any, denominator: Any) -> float | None:
    """``numerator / denominator``; ``None`` when either is unknown or the denominator is 0."""
    if not _is_number(numerator) or not _is_number(denominator) or denominator <= 0:
        return None
    return numerator / denominator


def _average(values: list[Any], weights: list[int] | None) -> float | None:
    """Mean of ``values`` weighted by ``weights`` (unweighted when ``None``); unknown if any is."""
    if not values or not all(_is_number(v) for v in values):
        return None
    if weights is None:
        return sum(values) / len(values)
    total = sum(weights)
    if total <= 0:
        return None
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total


def _format(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "d" and isinstance(value, float) and value.is_integer():
        value = int(value)
    if fmt != "s" and not _is_number(value):
        return str(value)
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)
