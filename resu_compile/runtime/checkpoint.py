"""The controller's checkpoint: what it saves, and the checks a load passes before it applies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from resu_compile.config import ResuConfig
from resu_compile.runtime.phase import Phase

if TYPE_CHECKING:
    from resu_compile.runtime.controller import PhaseController

FORMAT = 2


def save(controller: PhaseController) -> dict[str, Any]:
    """Everything needed to continue bit-identically (``torch.load(weights_only=True)``-safe)."""
    return {
        "format": FORMAT,
        "config": controller.config.to_dict(),
        "phase": controller.phase.value,
        "cycle": controller.cycle,
        "step_count": controller.step_count,
        "resu_steps": controller.resu_steps,
        "paused_steps": controller.paused_steps,
        "target_sparsity": controller.target_sparsity,
        "nonfinite_steps": controller.nonfinite_steps,
        "history": controller.history,
        "weights": controller.state.state_dict(),
    }


def load(controller: PhaseController, state: dict[str, Any]) -> None:
    """Restore a :func:`save`; refuses (changing nothing) if it does not fit."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"load_state_dict: not a resu-compile controller state of format {FORMAT}")
    saved, current = state["config"], controller.config.to_dict()
    for option in ResuConfig.checkpoint_options():
        if saved.get(option) != current[option]:
            raise ValueError(
                f"load_state_dict: option '{option}' differs: checkpoint {saved.get(option)!r}, "
                f"this model {current[option]!r}"
            )
    phase = Phase(state["phase"])
    _check_weight_names(controller, state["weights"])
    controller.state.load_state_dict(state["weights"])
    controller.phase = phase
    controller.cycle = int(state["cycle"])
    controller.step_count = int(state["step_count"])
    controller.resu_steps = int(state["resu_steps"])
    controller.paused_steps = int(state["paused_steps"])
    controller.target_sparsity = float(state["target_sparsity"])
    controller.restore_nonfinite_steps(int(state["nonfinite_steps"]))
    controller.history = list(state["history"])
    controller.pruned = any("mask_bits" in entry for entry in state["weights"].values())


def _check_weight_names(controller: PhaseController, weights: dict[str, Any]) -> None:
    """With the model known, every checkpoint weight must be one of its parameters."""
    module = controller.module()
    if module is None:
        return
    params = dict(module.named_parameters())
    for name in weights:
        if name not in params:
            raise ValueError(
                f"load_state_dict: checkpoint manages {name!r}, which this model does not have"
            )
