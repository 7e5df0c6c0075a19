"""What the Triton kernels share: element types, tiles, packed bits, segment tables, Adam's body.

Two tile shapes. The transition kernels (masked zero, top-k, commit, ...) read tiles of
``[BLOCK // 8, 8]``: one mask byte per row, so bits pack and unpack with one shift per column. The
update kernels read ``[BLOCK // VEC, VEC]`` tiles, ``VEC`` being the elements of one 128-bit access
(4 fp32, 8 fp16/bf16): each tile row is one vector load or store per tensor and lies within one
mask byte. Pieces start at multiples of 8 elements, so on whole mask bytes
(:mod:`resu_compile.kernels.launch`).

The kernels do not specialize on how many tensors a launch serves (``do_not_specialize``; Triton
would otherwise compile apart for a count of 1 and for multiples of 16): one compiled kernel serves
every launch of its family, so a launch over a subset of the weights (a commit's shortfall, one
layer) finds it compiled, and compiling it ahead (:mod:`resu_compile.runtime.warmup`) covers them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


@triton.jit
def load_chunk(chunks_ptr, numels_ptr, CHUNK: tl.constexpr):
    """This program's piece: its index, segment, first element and its segment's size."""
    pid = tl.program_id(0)
    seg = tl.load(chunks_ptr + 2 * pid)
    start = tl.load(chunks_ptr + 2 * pid + 1).to(tl.int64) * CHUNK
    return pid, seg, start, tl.load(numels_ptr + seg)


@triton.jit
def segment_ptr(addrs_ptr, row, n_segments, seg, DTYPE: tl.constexpr):
    """Segment ``seg``'s tensor of address row ``row``, as a ``DTYPE`` pointer."""
    return tl.load(addrs_ptr + row * n_segments + seg).to(tl.pointer_type(DTYPE))


@triton.jit
def tile(start, n, BLOCK: tl.constexpr):
    """Offsets ``[BLOCK // 8, 8]`` of the tile at ``start``, whether each is in bounds, and the
    byte offsets of its rows with whether each row holds an element."""
    rows = tl.arange(0, BLOCK // 8)
    offs = start + rows[:, None] * 8 + tl.arange(0, 8)[None, :]
    return offs, offs < n, start // 8 + rows, start + rows * 8 < n


@triton.jit
def tile_bits(bits_ptr, byte_offs, row_inb):
    """The bits of a :func:`tile` as an int32 ``[BLOCK // 8, 8]`` of 0 / 1 (0 out of bounds)."""
    byte = tl.load(bits_ptr + byte_offs, mask=row_inb, other=0).to(tl.int32)
    return (byte[:, None] >> tl.arange(0, 8)[None, :]) & 1


@triton.jit
def pack_tile(bits):
    """``[BLOCK // 8, 8]`` of 0 / 1 -> the ``BLOCK // 8`` uint8 bytes (bit ``j`` of a row = column
    ``j``), the format of :mod:`resu_compile.kernels.bits`."""
    return tl.sum(bits.to(tl.int32) << tl.arange(0, 8)[None, :], 1).to(tl.uint8)


@triton.jit
def vector_tile(start, n, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Offsets ``[BLOCK // VEC, VEC]`` of the block at ``start`` and their in-bounds predicate."""
    rows = tl.arange(0, BLOCK // VEC)
    offs = start + (rows[:, None] * VEC + tl.arange(0, VEC)[None, :])
    return offs, offs < n


@triton.jit
def vector_tile_bits(bits_ptr, start, n, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """The bit of every element of :func:`vector_tile`, as booleans; out-of-bounds elements read 0.

    Element ``i`` is bit ``i & 7`` of byte ``i >> 3`` (bits.py), so row ``r`` lies in byte
    ``start // 8 + r // (8 // VEC)`` from bit ``(r % (8 // VEC)) * VEC``: a thread loads one byte
    per row it holds and expands it with shifts. ``max_contiguous(.., 1)`` keeps that load in the
    rows' own register layout; left alone, Triton vectorises it in a layout of its own and converts
    through shared memory, behind a barrier that holds back every data load of the block.
    """
    rows = tl.arange(0, BLOCK // VEC)
    byte_idx = tl.max_contiguous(start // 8 + rows // (8 // VEC), 1)
    byte = tl.load(bits_ptr + byte_idx, mask=byte_idx * 8 < n, other=0).to(tl.int32)
    shift = (rows % (8 // VEC)) * VEC
    return ((byte[:, None] >> (shift[:, None] + tl.arange(0, VEC)[None, :])) & 1) != 0


@triton.jit
def update_block(blocks_ptr, numels_ptr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """An update program's tensor index, block start and tensor size, from the host-built tables."""
    pid = tl.program_id(0)
    t = tl.load(blocks_ptr + 2 * pid)
    start = tl.load(blocks_ptr + 2 * pid + 1).to(tl.int64) * BLOCK
    n = tl.load(numels_ptr + t)
    if ALIGNED:
        n = tl.multiple_of(n, 16)
    return t, start, n


@triton.jit
def update_ptr(addrs_ptr, row, n_tensors, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t`` of address row ``row`` as a ``DTYPE`` pointer.

    Divisibility does not survive an integer-to-pointer cast, so without the hint no access would
    be vectorised; the host sets ``ALIGNED`` only when every base address of the call is 16-byte
    aligned (and every size a multiple of 16, for the bounds predicate).
    """
    ptr = tl.load(addrs_ptr + row * n_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def store_active(ptr, offs, inb, active, value, KEEP_PRUNED: tl.constexpr):
    """Store ``value`` on active coordinates; pruned ones get 0, or keep their bits."""
    if KEEP_PRUNED:
        old = tl.load(ptr + offs, mask=inb)
        tl.store(ptr + offs, tl.where(active, value.to(old.dtype), old), mask=inb)
    else:
        tl.store(ptr + offs, tl.where(active, value, 0.0).to(ptr.dtype.element_ty), mask=inb)


@triton.jit
def adam_math(
    p,
    g,
    m,
    v,
    lerp_w,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    decay,
    neg_step_size,
    bc2_sqrt,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
):
    """torch's single-tensor Adam body in fp32; ``lerp`` follows torch's two-sided formula."""
    if HAS_WD:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + weight_decay * p
    m = tl.where(lerp_w < 0.5, m + lerp_w * (g - m), g - (g - m) * (1.0 - lerp_w))
    v = v * beta2 + (one_minus_beta2 * g) * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)
    return p, m, v


def adam_scalars(
    step: int, lr: float, beta1: float, beta2: float, weight_decay: float
) -> dict[str, float]:
    """Host-side scalars of torch's Adam step, computed in double exactly as torch does.

    Hyper-parameters reach the kernels as runtime fp32 scalars, so a learning-rate schedule never
    recompiles; only boolean structure (momentum on/off, nesterov, ...) is ``tl.constexpr``.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1 (the count after the increment), got {step}")
    return {
        "beta2": float(beta2),
        "one_minus_beta2": float(1 - beta2),
        "decay": float(1 - lr * weight_decay),
        "neg_step_size": float(-(lr / (1 - beta1**step))),
        "bc2_sqrt": float((1 - beta2**step) ** 0.5),
    }
