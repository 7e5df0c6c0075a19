"""StateManager: what RESU keeps per managed weight, keyed by Parameter identity.

Per weight: the mask as packed bits (1 bit per weight: the only memory RESU adds in the default
configuration), the RESU selection S as packed bits while the RESU phase runs, the input-column
norms recorded by the calibrate variant, and theta-optimizer buffers when the user's optimizer has
no free slot to hold them. Which coordinates were ever resurrected (for the survival telemetry of
METHOD.md section 6) is kept as packed bits in host memory, so telemetry costs no device memory.
Several Dynamo graphs (graph breaks, DDP buckets) find the same record
through the Parameter object itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from resu_compile.kernels.bits import count_bits, pack_bits, unpack_bits
from resu_compile.shards import ShardLayout

# Per-weight tensors a checkpoint carries (revived_bits: ever resurrected, for survival telemetry).
_TENSOR_FIELDS = ("mask_bits", "select_bits", "revived_bits", "input_sq_norms")


@dataclass
class ManagedWeight:
    """One managed Parameter and its RESU state.

    For a sharded parameter (``shard`` set: FSDP2), the bits, counts, ``shape`` and ``numel``
    are those of this rank's shard; ``shard`` places it in the full weight.
    """

    name: str
    param: torch.nn.Parameter
    ops: list[str] = field(default_factory=list)
    input_dim: int | None = None
    mask_bits: torch.Tensor | None = None
    select_bits: torch.Tensor | None = None
    revived_bits: torch.Tensor | None = None
    input_sq_norms: torch.Tensor | None = None
    theta_buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    graph_masked: bool = True
    keep_target: int | None = None
    #: theta's state is kept in ``theta_buffers`` only (the optimizer's slots are not free).
    theta_private: bool = False
    shard: ShardLayout | None = None
    #: How its products run in the 2:4 phases under ``semi_sparse`` (None: the option is off).
    semi_sparse_products: str | None = None
    _active: int | None = field(default=None, repr=False)
    _selected: int | None = field(default=None, repr=False)
    _all_active_bits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def reduction_dim(self) -> int:
        """The dim the weight's matmul reduces over (its inputs): ``input_dim`` where the pass
        found one (0 for GPT-2's ``(in, out)`` ``Conv1D``), else 1 (``nn.Linear``'s layout)."""
        return 1 if self.input_dim is None else self.input_dim

    @property
    def shape(self) -> torch.Size:
        return self.param.shape if self.shard is None else torch.Size(self.shard.local_shape)

    @property
    def numel(self) -> int:
        return self.param.numel() if self.shard is None else self.shape.numel()

    @property
    def total_numel(self) -> int:
        """Elements of the full weight (all shards)."""
        return self.numel if self.shard is None else self.shard.global_numel

    def mask(self) -> torch.Tensor | None:
        """Bool mask (True = active), or None while the weight has never been pruned."""
        return None if self.mask_bits is None else unpack_bits(self.mask_bits, self.shape)

    def set_mask(self, mask: torch.Tensor, active: int | None = None) -> None:
        """Store ``mask``; ``active`` (its True count, when the caller knows it) saves a count."""
        self.mask_bits = pack_bits(mask)
        self._active = active

    def set_mask_bits(self, bits: torch.Tensor, active: int | None = None) -> None:
        """Store an already packed mask; ``active`` as in :meth:`set_mask`."""
        self.mask_bits = bits
        self._active = active

    def mask_bits_or_all_active(self) -> torch.Tensor:
        """The packed mask, or all-ones bits for a weight not pruned yet (graph inputs need one)."""
        if self.mask_bits is not None:
            return self.mask_bits
        if self._all_active_bits is None:
            self._all_active_bits = pack_bits(
                torch.ones(self.shape, dtype=torch.bool, device=self.param.device)
            )
        return self._all_active_bits

    def input_norm_buffer(self) -> torch.Tensor:
        """float32 accumulator of squared input-column norms (empty without a linear use)."""
        if self.input_sq_norms is None:
            features = self.shape[self.input_dim] if self.input_dim is not None else 0
            self.input_sq_norms = torch.zeros(
                features, dtype=torch.float32, device=self.param.device
            )
        return self.input_sq_norms

    def selection(self) -> torch.Tensor | None:
        return None if self.select_bits is None else unpack_bits(self.select_bits, self.shape)

    def set_selection(self, bits: torch.Tensor | None, count: int | None = None) -> None:
        """Store the RESU selection S as packed bits; ``count`` (its size, when the caller
        knows it) saves a count."""
        self.select_bits = bits
        self._selected = count

    def selected_count(self) -> int:
        """``|S|``: how many pruned coordinates train as theta (0 outside the RESU phase)."""
        if self.select_bits is None:
            return 0
        if self._selected is None:
            self._selected = count_bits(self.select_bits)
        return self._selected

    def active_count(self) -> int:
        if self.mask_bits is None:
            return self.numel
        if self._active is None:
            self._active = count_bits(self.mask_bits)
        return self._active

    def sparsity(self) -> float:
        return 1.0 - self.active_count() / self.numel

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": list(self.shape)}
        if self.keep_target is not None:
            out["keep_target"] = self.keep_target
        for key in _TENSOR_FIELDS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value.detach().cpu().clone()
        for key, value in self.theta_buffers.items():
            out[f"theta.{key}"] = value.detach().cpu().clone()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.param.device
        for key in _TENSOR_FIELDS:
            value = state.get(key)
            where = "cpu" if key == "revived_bits" else device
            setattr(self, key, None if value is None else value.to(where).clone())
        self._active = None
        self._selected = None
        self.keep_target = state.get("keep_target")
        self.theta_buffers = {
            key.removeprefix("theta."): value.to(device=device, dtype=self.param.dtype).clone()
            for key, value in state.items()
            if key.startswith("theta.")
        }


@dataclass(frozen=True)
class SkippedCandidate:
    """A parameter the pass saw and chose not to manage, with the reason shown in the report."""

    name: str
    shape: tuple[int, ...]
    reason: str


class StateManager:
    """All managed weights of one compiled model, plus the candidates that were skipped."""

    def __init__(self) -> None:
        self._by_id: dict[int, ManagedWeight] = {}
        self._skipped: dict[str, SkippedCandidate] = {}
        self._pending: dict[str, dict[str, Any]] = {}
        self._ordered: list[ManagedWeight] | None = None

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):
        if self._ordered is None:
            self._ordered = sorted(self._by_id.values(), key=lambda w: w.name)
        return iter(self._ordered)

    def get(self, param: torch.Tensor) -> ManagedWeight | None:
        return self._by_id.get(id(param))

    def by_name(self, name: str) -> ManagedWeight:
        for weight in self._by_id.values():
            if weight.name == name:
                return weight
        raise KeyError(f"no managed weight named {name!r}; managed: {self.names()}")

    def names(self) -> list[str]:
        return [w.name for w in self]

    def skipped(self) -> list[SkippedCandidate]:
        return sorted(self._skipped.values(), key=lambda s: s.name)

    def register(self, param: torch.nn.Parameter, name: str) -> ManagedWeight:
        """Record ``param`` as managed; applies state loaded before the weight was seen."""
        weight = self._by_id.get(id(param))
        if weight is None:
            weight = ManagedWeight(name=name, param=param)
            pending = self._pending.pop(name, None)
            if pending is not None:
                _check_shape(name, pending, param)
                weight.load_state_dict(pending)
            self._by_id[id(param)] = weight
            self._ordered = None
            self._skipped.pop(name, None)
        return weight

    def skip(self, name: str, param: torch.Tensor, reason: str) -> None:
        if id(param) not in self._by_id:
            self._skipped[name] = SkippedCandidate(name, tuple(param.shape), reason)

    def state_dict(self) -> dict[str, Any]:
        return {w.name: w.state_dict() for w in self}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Load per-weight state; weights not registered yet receive it when first seen.

        Every registered weight's entry is checked before anything is assigned, so a mismatch
        changes nothing.
        """
        registered = {w.name: w for w in self._by_id.values()}
        missing = sorted(set(registered) - set(state))
        if missing:
            raise ValueError(
                f"load_state_dict: checkpoint has no RESU state for managed weight {missing[0]!r}"
            )
        for name, entry in state.items():
            if name in registered:
                _check_shape(name, entry, registered[name].param)
        for name, entry in state.items():
            if name in registered:
                registered[name].load_state_dict(entry)
        self._pending = {n: e for n, e in state.items() if n not in registered}

    def pending_names(self) -> list[str]:
        return sorted(self._pending)


def _check_shape(name: str, entry: dict[str, Any], param: torch.Tensor) -> None:
    shape = tuple(entry.get("shape", ()))
    if shape != tuple(param.shape):
        raise ValueError(
            f"load_state_dict: shape mismatch for {name!r}: checkpoint {shape}, "
            f"model {tuple(param.shape)}"
        )
