"""The controller's state for ``torch.distributed.checkpoint`` (DCP), sharded with the model.

Each managed weight's per-coordinate state (mask, RESU selection, ever-resurrected bits, theta's
own buffers) is saved as a DTensor laid out as the weight itself: one byte per coordinate, unpacked,
so its meaning does not depend on how the weight is cut into shards, and DCP can load it at another
world size. Counters, phase and history are plain values, the same on every rank.

DCP loads into a template: the state dict of a model built and compiled the same way, after one
forward pass (which registers the managed weights); every key is present in every state, with
flags saying which tensors are real, so a template made before any prune receives everything.
"""

from __future__ import annotations

from typing import Any

import torch

from resu_compile.kernels.bits import pack_bits, unpack_bits
from resu_compile.shards import local
from resu_compile.state import ManagedWeight

# Theta's own buffers that a sharded run can create (optim.slots.theta_moments): always saved.
THETA_BUFFERS = ("exp_avg", "exp_avg_sq")


def _like_param(weight: ManagedWeight, values: torch.Tensor) -> torch.Tensor:
    """``values`` (the local shard's shape) as a DTensor laid out as ``weight.param``."""
    from torch.distributed.tensor import DTensor

    param = weight.param
    return DTensor.from_local(
        values.contiguous(),
        param.device_mesh,
        param.placements,
        shape=param.shape,
        stride=param.stride(),
        run_check=False,
    )


def _bytes(bits: torch.Tensor | None, weight: ManagedWeight, fill: bool) -> torch.Tensor:
    device = weight.param.device
    if bits is None:
        return torch.full(weight.shape, int(fill), dtype=torch.uint8, device=device)
    return unpack_bits(bits.to(device), weight.shape).to(torch.uint8)


def weight_state(weight: ManagedWeight) -> dict[str, Any]:
    """One sharded weight's entry: DTensors of the weight's shape, and flags."""
    if weight.shard is None:
        raise ValueError(
            f"sharded_state_dict(): managed weight {weight.name!r} is not sharded; use "
            "state_dict() for unsharded models"
        )
    out: dict[str, Any] = {
        "shape": list(weight.param.shape),
        "keep_target": weight.keep_target,
        "pruned": weight.mask_bits is not None,
        "selected": weight.select_bits is not None,
        "mask": _like_param(weight, _bytes(weight.mask_bits, weight, True)),
        "select": _like_param(weight, _bytes(weight.select_bits, weight, False)),
        "revived": _like_param(weight, _bytes(weight.revived_bits, weight, False)),
        "theta_keys": sorted(weight.theta_buffers),
    }
    zeros = torch.zeros_like(local(weight.param.detach()))
    for key in THETA_BUFFERS:
        out[f"theta.{key}"] = _like_param(weight, weight.theta_buffers.get(key, zeros))
    return out


def load_weights(weights: list[ManagedWeight], entries: dict[str, dict[str, Any]]) -> None:
    """Apply the per-weight entries of a filled sharded state, all checked before any is applied:
    the same managed weights (by name) of the same shapes."""
    by_name = {w.name: w for w in weights}
    if sorted(by_name) != sorted(entries):
        raise ValueError(
            "load_sharded_state_dict: the checkpoint's managed weights "
            f"{sorted(entries)} are not this model's {sorted(by_name)} (run one "
            "forward pass before building the template)"
        )
    for name, entry in entries.items():
        _check_weight_state(by_name[name], entry)
    for name, entry in entries.items():
        _load_weight_state(by_name[name], entry)


def _check_weight_state(weight: ManagedWeight, entry: dict[str, Any]) -> None:
    if list(entry["shape"]) != list(weight.param.shape):
        raise ValueError(
            f"load_sharded_state_dict: shape mismatch for {weight.name!r}: checkpoint "
            f"{tuple(entry['shape'])}, model {tuple(weight.param.shape)}"
        )


def _load_weight_state(weight: ManagedWeight, entry: dict[str, Any]) -> None:
    """Apply an entry that ``torch.distributed.checkpoint.load`` filled (checked first by
    :func:`_check_weight_state`)."""
    weight.keep_target = entry["keep_target"]
    if entry["pruned"]:
        weight.set_mask(local(entry["mask"]).bool())
    else:
        weight.set_mask_bits(None)
    weight.set_selection(pack_bits(local(entry["select"]).bool()) if entry["selected"] else None)
    revived = local(entry["revived"]).bool()
    weight.revived_bits = pack_bits(revived).cpu() if bool(revived.any()) else None
    weight.theta_buffers = {
        key: local(entry[f"theta.{key}"]).clone() for key in entry["theta_keys"]
    }
