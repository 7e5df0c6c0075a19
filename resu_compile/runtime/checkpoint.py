"""The controller's checkpoint format: what is saved, and the checks a load passes before the
controller applies anything."""

from __future__ import annotations

from typing import Any

import torch

from resu_compile.config import ResuConfig
from resu_compile.runtime.phase import Phase

FORMAT = 2

#: The run's counters, by checkpoint key, and how each is read back.
COUNTERS: dict[str, type] = {
    "cycle": int,
    "step_count": int,
    "resu_steps": int,
    "paused_steps": int,
    "target_sparsity": float,
    "nonfinite_steps": int,
}


def save(
    config: ResuConfig,
    phase: Phase,
    counters: dict[str, Any],
    history: list[dict[str, Any]],
    weights: dict[str, Any],
) -> dict[str, Any]:
    """Everything needed to continue bit-identically (``torch.load(weights_only=True)``-safe)."""
    return {
        "format": FORMAT,
        "config": config.to_dict(),
        "phase": phase.value,
        **{key: counters[key] for key in COUNTERS},
        "history": history,
        "weights": weights,
    }


def check(
    state: Any, config: ResuConfig, module: torch.nn.Module | None
) -> tuple[Phase, dict[str, Any]]:
    """The phase and counters of a saved state, once it is known to fit ``config`` and
    ``module``; raises ``ValueError`` (nothing applied) if it does not."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"load_state_dict: not a resu-compile controller state of format {FORMAT}")
    saved, current = state["config"], config.to_dict()
    for option in ResuConfig.checkpoint_options():
        if saved.get(option) != current[option]:
            raise ValueError(
                f"load_state_dict: option '{option}' differs: checkpoint {saved.get(option)!r}, "
                f"this model {current[option]!r}"
            )
    phase = Phase(state["phase"])
    if module is not None:
        params = dict(module.named_parameters())
        for name in state["weights"]:
            if name not in params:
                raise ValueError(
                    f"load_state_dict: checkpoint manages {name!r}, which this model does not have"
                )
    return phase, {key: kind(state[key]) for key, kind in COUNTERS.items()}
