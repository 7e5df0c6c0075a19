"""The controller's checkpoint format: what is saved, and the checks a load passes before the
controller applies anything.

A saved state records what it must agree with: the options (those that change what the masks
mean, and those that change the run), the managed names and shapes, and a fingerprint (CRC-32) of
every mask and selection. :func:`check` validates the whole state, and the model it is loaded
into, before anything is applied: a truncated, tampered or mismatched state changes nothing.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from resu_compile.config import ResuConfig
from resu_compile.kernels.bits import packed_numel, unpack_bits
from resu_compile.optim.updates import weight_shaped_state
from resu_compile.runtime.phase import Phase
from resu_compile.state import ManagedWeight

FORMAT = 3

#: The run's counters, by checkpoint key, and how each is read back.
COUNTERS: dict[str, type] = {
    "cycle": int,
    "step_count": int,
    "resu_steps": int,
    "paused_steps": int,
    "target_sparsity": float,
    "nonfinite_steps": int,
}

#: Options that change the run's schedule, numbers or managed set but not what a saved mask
#: means: a mismatch is refused unless the load passes ``strict=False`` (then it warns).
RUN_OPTIONS = (
    "steps_per_cycle",
    "total_steps",
    "phase_fractions",
    "seed",
    "gradient_mask",
    "include",
    "exclude",
)

#: Per-weight packed-bit tensors (one bit per weight of the entry's shape).
_BITS = ("mask_bits", "select_bits", "revived_bits")
#: Of those, the ones the fingerprint covers (they decide the masks).
_FINGERPRINTED = ("mask_bits", "select_bits")


@dataclass
class Loaded:
    """A state that passed :func:`check`: what the controller applies, and what it must say."""

    phase: Phase
    counters: dict[str, Any]
    #: Mismatches accepted under ``strict=False``, to be warned about.
    warnings: list[str] = field(default_factory=list)
    #: Model weights to zero where the loaded masks prune them (``strict=False`` only).
    to_zero: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def fingerprint(bits: torch.Tensor) -> int:
    return zlib.crc32(bits.detach().cpu().contiguous().numpy().tobytes())


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
        "fingerprints": {
            name: {key: fingerprint(entry[key]) for key in _FINGERPRINTED if key in entry}
            for name, entry in weights.items()
        },
    }


def check(
    state: Any, config: ResuConfig, module: torch.nn.Module | None, *, strict: bool = True
) -> Loaded:
    """Validate a saved state as a whole against ``config`` and ``module``; raises
    ``ValueError`` naming the key (nothing applied) if it does not fit.

    ``strict=False`` accepts, with a warning each, a mismatch of the :data:`RUN_OPTIONS` and
    model weights that the masks would prune but are nonzero (they are zeroed when applied).
    """
    _check_structure(state)
    loaded = Loaded(
        Phase(state["phase"]), {key: kind(state[key]) for key, kind in COUNTERS.items()}
    )
    saved, current = ResuConfig.with_legacy(state["config"]), config.to_dict()
    for option in [*ResuConfig.checkpoint_options(), *RUN_OPTIONS]:
        if saved.get(option) != current[option]:
            message = (
                f"load_state_dict: option '{option}' differs: checkpoint {saved.get(option)!r}, "
                f"this model {current[option]!r} (compile with {option}={saved.get(option)!r} "
                "to load it)"
            )
            if option not in RUN_OPTIONS:
                raise ValueError(message)
            if strict:
                raise ValueError(message + " (pass strict=False to load it anyway)")
            loaded.warnings.append(message + "; loaded anyway (strict=False)")
    params = dict(module.named_parameters()) if module is not None else None
    if params is not None:
        _check_names(state, config, params)
    for name, entry in state["weights"].items():
        _check_bits(name, entry, state["fingerprints"].get(name))
    if params is not None:
        _check_weights(state, params, loaded, strict)
    return loaded


def _check_structure(state: Any) -> None:
    """Every key present with the right type, every weight entry a dict with a shape."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"load_state_dict: not a resu-compile controller state of format {FORMAT}")
    for key, kind in {
        "config": dict,
        "history": list,
        "weights": dict,
        "fingerprints": dict,
    }.items():
        _require(key in state and isinstance(state[key], kind), key, f"a {kind.__name__}", state)
    _require(state.get("phase") in {p.value for p in Phase}, "phase", "a phase name", state)
    for key, kind in COUNTERS.items():
        allowed = (int, float) if kind is float else (int,)
        valid = isinstance(state.get(key), allowed) and not isinstance(state.get(key), bool)
        _require(valid, key, "an int" if kind is int else "a number", state)
    _require(
        all(isinstance(e, dict) and isinstance(e.get("event"), str) for e in state["history"]),
        "history",
        "a list of events (dicts with an 'event' name)",
        state,
    )
    for name, entry in state["weights"].items():
        where = f"weights[{name!r}]"
        if not isinstance(entry, dict):
            raise ValueError(f"load_state_dict: {where} must be a dict, got {type(entry).__name__}")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ValueError(
                f"load_state_dict: {where}['shape'] must be a list of sizes, got {shape!r}"
            )


def _check_bits(name: str, entry: dict[str, Any], prints: Any) -> None:
    """Every bit tensor as long as the entry's shape needs, the masks equal to their
    fingerprints, theta's buffers of the entry's shape."""
    where = f"weights[{name!r}]"
    shape = entry["shape"]
    numel = math.prod(shape)
    for key in _BITS:
        value = entry.get(key)
        if value is None:
            continue
        if not (
            isinstance(value, torch.Tensor)
            and value.dtype == torch.uint8
            and value.numel() == packed_numel(numel)
        ):
            got = (
                f"{value.numel()} values of {value.dtype}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise ValueError(
                f"load_state_dict: {where}[{key!r}] must be {packed_numel(numel)} uint8 values "
                f"for shape {tuple(shape)}, got {got} (truncated or not this weight's)"
            )
    for key, value in entry.items():
        if key.startswith("theta.") and not (
            isinstance(value, torch.Tensor) and list(value.shape) == shape
        ):
            raise ValueError(f"load_state_dict: {where}[{key!r}] must be a tensor of shape {shape}")
    prints = prints if isinstance(prints, dict) else {}
    for key in _FINGERPRINTED:
        value = entry.get(key)
        expected = prints.get(key)
        if (value is None) != (expected is None) or (
            value is not None and fingerprint(value) != expected
        ):
            raise ValueError(
                f"load_state_dict: {where}[{key!r}] does not match the fingerprint saved with it "
                "(the state was changed after it was saved)"
            )


def _check_names(
    state: dict[str, Any], config: ResuConfig, params: dict[str, torch.nn.Parameter]
) -> None:
    """The managed names exist in the model with the saved shapes, and its filters select them."""
    for name, entry in state["weights"].items():
        param = params.get(name)
        if param is None:
            raise ValueError(
                f"load_state_dict: checkpoint manages {name!r}, which this model does not have"
            )
        if tuple(entry["shape"]) != tuple(param.shape):
            raise ValueError(
                f"load_state_dict: shape mismatch for {name!r}: checkpoint "
                f"{tuple(entry['shape'])}, model {tuple(param.shape)}"
            )
        if not config.selects(name, param):
            raise ValueError(
                f"load_state_dict: checkpoint manages {name!r}, which this model's include / "
                "exclude filters leave out"
            )


def _check_weights(
    state: dict[str, Any], params: dict[str, torch.nn.Parameter], loaded: Loaded, strict: bool
) -> None:
    """In the RESU phase each trainable pruned weight has its selection; the model's weights are
    zero where the masks prune (outside the selection, in the RESU phase)."""
    in_resu = loaded.phase is Phase.RESU
    stale = []
    for name, entry in state["weights"].items():
        param = params[name]
        mask_bits = entry.get("mask_bits")
        if mask_bits is None:
            continue
        if in_resu and param.requires_grad and entry.get("select_bits") is None:
            raise ValueError(
                f"load_state_dict: weights[{name!r}] has no 'select_bits', which the RESU phase "
                "needs for every trainable pruned weight"
            )
        pruned = ~unpack_bits(mask_bits, param.shape).to(param.device)
        if in_resu and entry.get("select_bits") is not None:
            pruned &= ~unpack_bits(entry["select_bits"], param.shape).to(param.device)
        nonzero = int(torch.count_nonzero(param.detach()[pruned]))
        if nonzero:
            stale.append(f"{name!r}: {nonzero}")
            loaded.to_zero.append((param, pruned))
    if stale:
        message = (
            f"load_state_dict: the model's weights are nonzero where the checkpoint's masks prune "
            f"them ({', '.join(stale)}): load the model's state_dict saved with this resu state "
            "first"
        )
        if strict:
            raise ValueError(message + " (or pass strict=False to apply the masks to them)")
        loaded.warnings.append(message + "; the masks were applied to them (strict=False)")


def optimizer_problems(
    optimizer: torch.optim.Optimizer,
    weights: list[ManagedWeight],
    *,
    resumed_at: int,
    in_resu: bool,
) -> list[str]:
    """What is wrong with the optimizer's state of the (trainable) managed ``weights`` after a
    resu state was loaded: none at all although the run resumes mid-way (a fresh optimizer
    restarts their moments), or nonzero where the loaded masks prune (another run's state;
    checked outside the RESU phase, where theta's moments live on the pruned coordinates)."""
    problems = []
    missing = [
        w.name
        for w in weights
        if _keeps_state(optimizer, w.param) and not optimizer.state.get(w.param)
    ]
    if missing and resumed_at > 0:
        problems.append(
            f"the optimizer holds no state for managed weight(s) {missing} although the loaded "
            f"resu state resumes at step {resumed_at} (a fresh optimizer restarts their "
            "moments): load the optimizer's state_dict saved with it"
        )
    if not in_resu:
        stale = [
            w.name
            for w in weights
            if w.mask_bits is not None
            and any(
                bool(t.masked_select(~w.mask()).any())
                for t in weight_shaped_state(optimizer, w.param)
            )
        ]
        if stale:
            problems.append(
                f"the optimizer's state of {stale} is nonzero where the loaded masks prune: it "
                "is not the state saved with this resu state"
            )
    return problems


def steps_taken(optimizer: torch.optim.Optimizer, weights: list[ManagedWeight]) -> int:
    """The most optimizer steps any of ``weights`` has taken (its ``state["step"]``)."""
    steps = [optimizer.state.get(w.param, {}).get("step") for w in weights]
    return max((int(step) for step in steps if step is not None), default=0)


def _keeps_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    """Whether ``optimizer`` keeps state for ``param`` once it has stepped it (SGD without
    momentum keeps none)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return True
    return any(
        g.get("momentum", 0) != 0
        for g in optimizer.param_groups
        if any(p is param for p in g["params"])
    )


def _require(condition: bool, key: str, allowed: str, state: dict[str, Any]) -> None:
    if not condition:
        got = repr(state[key]) if key in state else "nothing (missing)"
        if len(got) > 80:
            got = f"a {type(state[key]).__name__}"
        raise ValueError(f"load_state_dict: key '{key}' must be {allowed}, got {got}")
