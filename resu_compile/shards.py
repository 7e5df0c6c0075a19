"""Sharded managed weights: where a rank's shard sits in the full weight, and its local tensors.

Under FSDP2 a managed weight is a DTensor sharded along dim 0 over a 1-D mesh. Each rank keeps the
RESU state of its own shard only (mask and selection bits of the local rows), and every update and
transition works on the local tensors. Row-major order makes each shard one contiguous range of the
full weight's flat indices, in the order of the ranks, which is what lets a distributed selection
break ties by global index exactly as a single process does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without torch.distributed
    DTensor = Shard = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class ShardLayout:
    """One rank's shard of a weight: rows ``[row_offset, row_offset + local_shape[0])``."""

    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    row_offset: int
    group: Any  # the mesh's ProcessGroup
    rank: int  # this shard's place among the shards (the rank in ``group``)
    world: int

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)

    @property
    def offset(self) -> int:
        """Global flat index of the shard's first element."""
        return self.row_offset * math.prod(self.global_shape[1:])

    def local_slice(self, full: torch.Tensor) -> torch.Tensor:
        """This shard's rows of a tensor of the full weight's shape."""
        return full.narrow(0, self.row_offset, self.local_shape[0])


def is_dtensor(tensor: Any) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's local tensor of a DTensor (writes land in the shard); others as given.

    Outside autograd ``to_local`` hands back the DTensor's own local tensor, the same object at
    every call, so identity checks between a weight's states keep working.
    """
    if not is_dtensor(tensor):
        return tensor
    with torch.no_grad():
        return tensor.to_local()


def shard_layout(param: torch.Tensor, name: str) -> ShardLayout:
    """The layout of a DTensor parameter; refuses placements other than FSDP2's default."""
    mesh, placements = param.device_mesh, param.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(
            f"resu.compile: managed weight {name!r} is sharded as {tuple(placements)} over a "
            f"{mesh.ndim}-D mesh; only FSDP2's default layout (Shard(0) over a 1-D mesh) is "
            "supported (no HSDP, tensor parallelism or shard_placement_fn)"
        )
    rank, world = mesh.get_local_rank(), mesh.size()
    rows = param.shape[0]
    per_rank = -(-rows // world)  # torch.chunk's split, as FSDP2 shards dim 0
    row_offset = min(rank * per_rank, rows)
    local_shape = tuple(param.to_local().shape)
    if local_shape[0] != max(0, min(per_rank, rows - row_offset)):
        raise ValueError(
            f"resu.compile: managed weight {name!r}: local shard of {local_shape[0]} rows does not "
            f"match FSDP2's dim-0 chunking of {rows} rows over {world} ranks"
        )
    return ShardLayout(tuple(param.shape), local_shape, row_offset, mesh.get_group(), rank, world)
