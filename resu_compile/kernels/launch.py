"""The host side of every multi-tensor launch: routing, tables, checks. Pure PyTorch.

Every kernel family serves a list of tensors (one per managed weight) with one launch per
(device, dtype) group, as ``torch.optim``'s ``_multi_tensor_adam`` groups its lists; a single
tensor is a list of one. Which tensors the Triton kernels serve is decided here (:func:`on_gpu`,
:func:`route`); everything else takes the family's pure-PyTorch reference, which is also the CPU
path. Nothing here imports Triton: the kernels (:mod:`resu_compile.kernels.triton`) are imported by
a family only once a CUDA tensor needs them.

A launch sees its tensors as *segments* of one problem: the grid runs over fixed-size pieces of
every segment (a cached host-built table maps program -> (segment, piece)), and each segment's
tensors are reached through a table of base addresses, one row per role (param, grad, states,
bits, ...). The transition kernels take pieces of ``CHUNK`` elements, the update kernels of their
``BLOCK`` (:func:`launch_config`); both are multiples of 8, so every piece starts on a whole byte of
a packed mask (:mod:`resu_compile.kernels.bits`) and no two programs share a mask byte.
"""

from __future__ import annotations

import functools
import itertools
import operator
import os
from array import array
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

import torch

from resu_compile.kernels.bits import packed_numel

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
T = TypeVar("T")

# The transition kernels: tiles of BLOCK elements seen as [BLOCK // 8, 8] (one mask byte per row),
# CHUNK_BLOCKS tiles per program. Triton's CPU interpreter (the CPU tests) runs every tile of a
# program even past a segment's end, so there chunks are short: small test tensors then span many
# chunks, which is what the cross-chunk logic (tie ranks, histogram flushes) needs tested.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 1024
CHUNK_BLOCKS = 2 if INTERPRETED else 16
CHUNK = BLOCK * CHUNK_BLOCKS
NUM_WARPS = 4

# The update kernels: (BLOCK, num_warps) by (the parameter's element size, whether theta's AdamW
# runs in the same pass), from benchmarks/tune_updates.py on an H100: 8 elements a thread (one
# 128-bit access per tensor in bf16, two in fp32) move 92-96% of the copy bandwidth; 16 leave too
# few threads resident to keep memory busy (bf16's theta update fell to 68%). The one-pass RESU
# step holds each coordinate's own scalars and its old values besides: in fp32 it needs 4 elements
# a thread (95%; 8 give 93%), in bf16 8 (80%; 4 give 79%, 16 give 76%). BLOCK: a power of two, at
# least 8.
LAUNCH_CONFIGS: dict[tuple[int, bool], tuple[int, int]] = {
    (4, False): (1024, 4),
    (2, False): (1024, 4),
    (4, True): (1024, 8),
    (2, True): (1024, 4),
}

# Every multiply and add of the update kernels rounds on its own, as torch's separate ops do: with
# fusion into FMAs (the default of Triton 3.6) each kernel's arithmetic depends on what the compiler
# makes of it, and the one-pass RESU step would differ from two passes in the last bit.
# benchmarks/tune_updates.py measures both settings.
FP_FUSION = False

# Base addresses and sizes the update kernels may assume divisible by this (16 bytes: one 128-bit
# access), when every tensor of a launch allows it; otherwise they run without the hint.
ALIGN = 16
_CACHE_SIZE = 16


def launch_config(dtype: torch.dtype, theta: bool = False) -> tuple[int, int, int]:
    """``(BLOCK, VEC, num_warps)`` of the update kernels for parameters of ``dtype`` (``theta``:
    the one-pass RESU step); ``VEC`` elements make one 128-bit access."""
    size = dtype.itemsize
    block, num_warps = LAUNCH_CONFIGS[size, theta]
    return block, 16 // size, num_warps


def on_gpu(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the Triton kernels serve these tensors (all on one CUDA device); else references.

    Each family calls it through its own module global, so a test can send CPU tensors to the
    interpreted kernels (or CUDA tensors to the references) by patching one family."""
    return bool(tensors) and all(t.is_cuda and t.device == tensors[0].device for t in tensors)


def route(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    serves: Callable[[Sequence[torch.Tensor]], bool] = on_gpu,
    optional: Sequence[Sequence[torch.Tensor | None]] = (),
) -> tuple[list[list[int]], list[int]]:
    """Indices of the weights one update launch each can take, and those left to the reference.

    A launch takes contiguous params and grads that ``serves`` (a family's :func:`on_gpu`) lets
    through, of one device, one param dtype and one grad dtype, and with each list of ``optional``
    present for all of them or for none. States and bits are not looked at: the launch checks
    them and raises (this runs every step, and on models whose step is bound by the host, host
    time is step time).
    """
    groups: dict[tuple, list[int]] = {}
    rest = []
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        if param.is_contiguous() and grad.is_contiguous() and serves([param, grad]):
            key = (param.device, param.dtype, grad.dtype, *(row[i] is None for row in optional))
            groups.setdefault(key, []).append(i)
        else:
            rest.append(i)
    return list(groups.values()), rest


def pick(values: Sequence[T] | None, indices: list[int]) -> Sequence[T] | None:
    """``values`` at ``indices`` (increasing); ``values`` itself when they are all of it, and
    ``None`` for an absent list."""
    if values is None or len(indices) == len(values):
        return values
    return [values[i] for i in indices]


class ChunkTables(NamedTuple):
    """The device tables of one list of segment sizes (see :func:`chunk_tables`)."""

    chunks: torch.Tensor  # int32 [C, 2]: (segment, piece index within the segment)
    numels: torch.Tensor  # int64 [S]
    first_chunk: torch.Tensor  # int64 [C]: the first piece of each piece's segment
    segment: torch.Tensor  # int64 [C]: each piece's segment

    @property
    def grid(self) -> tuple[int]:
        return (self.chunks.shape[0],)

    def segment_sums(self, per_chunk: torch.Tensor) -> torch.Tensor:
        """float64 [S]: the per-piece values summed over each segment's pieces."""
        sums = torch.zeros(self.numels.shape[0], dtype=torch.float64, device=per_chunk.device)
        return sums.index_add_(0, self.segment, per_chunk.double())


def chunk_tables(numels: Sequence[int], device: torch.device, size: int = CHUNK) -> ChunkTables:
    """Tables for segments of ``numels`` elements cut into pieces of ``size``; cached, since the
    sizes change only with the model (one host-to-device copy the first time)."""
    return _chunk_tables(tuple(numels), torch.device(device), size)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _chunk_tables(numels: tuple[int, ...], device: torch.device, size: int) -> ChunkTables:
    counts = torch.tensor([-(-n // size) for n in numels], dtype=torch.int64)
    total = int(counts.sum())
    if total >= 2**31:
        raise ValueError(f"{total} pieces of {size} elements do not fit one launch")
    segment = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts
    index = torch.arange(total) - first[segment]
    return ChunkTables(
        torch.stack([segment, index], dim=1).to(torch.int32).to(device),
        torch.tensor(list(numels), dtype=torch.int64).to(device),
        first[segment].to(device),
        segment.to(device),
    )


def address_table(rows: Sequence[Sequence[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """int64 base addresses, row-major: tensor ``s`` of row ``r`` at ``r * len(rows[0]) + s``."""
    for row in rows:
        for tensor in row:
            if not tensor.is_contiguous() or tensor.device != device:
                raise ValueError(f"segment tensors must be contiguous and on {device}")
    addrs = tuple([t.data_ptr() for row in rows for t in row])
    return _addresses(addrs, torch.device(device))[1]


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _addresses(addrs: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``addrs`` on the host and on ``device``. A table is its own key, so it is reused for as long
    as the tensors keep their storage: parameters and optimizer states always, gradients when the
    caching allocator hands the same blocks back; a miss costs one host-to-device copy of a few
    hundred int64. From pageable memory CUDA stages the copy before returning, without waiting for
    the stream; the cache keeps the host tensor alive all the same."""
    host = torch.frombuffer(array("q", addrs), dtype=torch.int64)
    return host, host.to(device, non_blocking=True)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _validated(lasting: tuple) -> list[bool]:
    """A flag per set of lasting tensors (ids, addresses, param shapes), raised once the whole
    set passed :func:`update_launch`'s checks."""
    return [False]


def check_found_inf(
    name: str, found_inf: torch.Tensor | None, params: Sequence[torch.Tensor]
) -> None:
    """``found_inf``: ``None``, or one fp32 / bool element on the weights' device (no sync)."""
    if found_inf is None:
        return
    if found_inf.dtype not in (torch.float32, torch.bool) or found_inf.numel() != 1:
        raise ValueError(f"{name}: found_inf must be a 1-element float32 or bool tensor")
    if params and found_inf.device != params[0].device:
        raise ValueError(f"{name}: found_inf must be on the weights' device")


class UpdateLaunch(NamedTuple):
    """What an update kernel's launch needs beyond the update's own scalars."""

    addrs: torch.Tensor  # int64 [rows * n_tensors]: row r, tensor t at r * n_tensors + t
    n_tensors: int
    tables: ChunkTables  # pieces of ``block`` elements
    aligned: bool
    block: int
    vec: int
    num_warps: int


def update_launch(
    name: str,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    bits: Sequence[Sequence[torch.Tensor]],
    theta: bool = False,
) -> UpdateLaunch | None:
    """Check one update launch's lists and build its tables (``theta``: the one-pass RESU step's
    launch configuration); ``None`` when there is nothing to update.

    Address rows, in this order: params, grads, each state list (the params' dtype), each
    packed-bit list. Params, states and bits live across steps: they are checked once per set of
    tensors, and a step re-checks only its new gradients. A tensor replaced (states reloaded, bits
    re-packed at a transition, a param's .data swapped) is built while the old one is alive, so it
    has another address and the set is checked again.
    """
    rows = [params, grads, *states, *bits]
    n_tensors = len(params)
    if any(len(row) != n_tensors for row in rows):
        raise ValueError(f"{name}: every list must have one tensor per parameter")
    if n_tensors == 0:
        return None
    dtype, grad_dtype, device = params[0].dtype, grads[0].dtype, params[0].device
    if INTERPRETED and device.type != "cpu":
        # The interpreter runs on host copies of the arguments; the addresses would be the device's.
        raise RuntimeError(f"{name}: under TRITON_INTERPRET the tensors must be on the CPU")
    if dtype not in FLOAT_DTYPES or grad_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: param/grad must be fp32, fp16 or bf16")
    shapes = [p.shape for p in params]
    numels = tuple(p.numel() for p in params)
    addrs = tuple([t.data_ptr() for row in rows for t in row])
    lasting = (
        tuple(map(id, itertools.chain(params, *states, *bits))),
        addrs[:n_tensors] + addrs[2 * n_tensors :],
        tuple(shapes),
    )
    checked = _validated(lasting)
    if not _rows_valid(rows, len(states), shapes, numels, None if not checked[0] else [1]):
        _raise_row_fault(name, rows, len(states), shapes, numels)
    checked[0] = True

    n_float = (2 + len(states)) * n_tensors  # the rows read as vectors: all but the bits
    # ALIGN is a power of two: every value is a multiple of it iff their bitwise OR is.
    aligned = functools.reduce(operator.or_, (*numels, *addrs[:n_float])) % ALIGN == 0
    block, vec, num_warps = launch_config(dtype, theta)
    tables = chunk_tables(numels, device, block)
    if tables.grid[0] == 0:
        return None
    return UpdateLaunch(
        _addresses(addrs, device)[1], n_tensors, tables, aligned, block, vec, num_warps
    )


def _rows_valid(
    rows: list[Sequence[torch.Tensor]],
    n_states: int,
    shapes: list[torch.Size],
    numels: tuple[int, ...],
    rows_to_check: list[int] | None,
) -> bool:
    """Whether every row (or those of ``rows_to_check``) is as :func:`update_launch` needs it:
    row-wide comparisons, which cost the host a fraction of a loop of checks per tensor."""
    dtype, grad_dtype, device = rows[0][0].dtype, rows[1][0].dtype, rows[0][0].device
    n = len(shapes)
    for r in range(len(rows)) if rows_to_check is None else rows_to_check:
        row = rows[r]
        floating = r < 2 + n_states
        want = torch.uint8 if not floating else grad_dtype if r == 1 else dtype
        if (
            [t.dtype for t in row] != [want] * n
            or [t.device for t in row] != [device] * n
            or not all([t.is_contiguous() for t in row])
            or (
                [t.shape for t in row] != shapes
                if floating
                else [t.numel() for t in row] != [packed_numel(m) for m in numels]
            )
        ):
            return False
    return True


def _raise_row_fault(
    name: str,
    rows: list[Sequence[torch.Tensor]],
    n_states: int,
    shapes: list[torch.Size],
    numels: tuple[int, ...],
) -> None:
    """The error for the first fault :func:`_rows_valid` found, tensor by tensor."""
    dtype, grad_dtype, device = rows[0][0].dtype, rows[1][0].dtype, rows[0][0].device
    for r, row in enumerate(rows):
        floating = r < 2 + n_states
        for t, shape, numel in zip(row, shapes, numels, strict=True):
            if floating and t.dtype != (grad_dtype if r == 1 else dtype):
                if r < 2:
                    raise TypeError(f"{name}: params (and grads) must share one dtype")
                raise ValueError(
                    f"{name}: state tensors must match param in shape, dtype and device"
                )
            if not floating and t.dtype != torch.uint8:
                raise ValueError(
                    f"{name}: packed bits must be a contiguous uint8 tensor on param's device"
                )
            if t.device != device:
                raise ValueError(f"{name}: every tensor must be on one device")
            if not t.is_contiguous():
                raise ValueError(f"{name}: every tensor must be contiguous")
            if floating and t.shape != shape:
                raise ValueError(f"{name}: grads and states must match their param's shape")
            if not floating and t.numel() != packed_numel(numel):
                raise ValueError(f"{name}: packed bits must hold ceil(numel / 8) bytes per param")
    raise AssertionError(f"{name}: _rows_valid and _raise_row_fault disagree")
