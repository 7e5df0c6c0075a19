"""The Triton kernels of :func:`resu_compile.kernels.segmented_topk.topk_bits`: histogram passes,
tie counts, packed output (the algorithm is in that module's docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from resu_compile.kernels.bits import packed_numel
from resu_compile.kernels.launch import (
    BLOCK,
    CHUNK_BLOCKS,
    NUM_WARPS,
    address_table,
    chunk_tables,
)
from resu_compile.kernels.triton.common import (
    TL_DTYPES,
    load_chunk,
    pack_tile,
    segment_ptr,
    tile,
    tile_bits,
)

# Digit widths of the passes over a 32-bit key, most significant first. ``tl.histogram``'s cost
# grows with its bin count: on an H100, 2048 bins ran at ~30G keys/s, well under the bandwidth of
# the reads; 256 bins per pass keep each pass near it, for one pass more.
DIGIT_BITS = 8
ALL_ELIGIBLE, ELIGIBLE_WHERE_SET, ELIGIBLE_WHERE_CLEAR = 0, 1, 2
_NO_KEY = tl.constexpr(1 << 32)  # above every key: the k-th key of a segment that keeps nothing
# Rows of the per-segment state the passes advance on the device (one int64 [rows, segments]):
# eligibility mode, k, count of keys above the current prefix, the prefix (then the k-th key).
_K, _ABOVE, _PREFIX = tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
# Address rows: scores, eligibility bits, outputs.
_SCORES, _ELIGIBLE, _OUT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _tile_keys(
    addrs_ptr,
    n_segments,
    seg,
    start,
    n,
    mode,
    DTYPE: tl.constexpr,
    MAGNITUDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Keys (int64 images of the uint32 keys) of the tile at ``start`` of segment ``seg``, whether
    each is eligible (and in bounds), and the tile's byte offsets with their row predicate."""
    offs, inb, byte_offs, row_inb = tile(start, n, BLOCK)
    x = tl.load(segment_ptr(addrs_ptr, _SCORES, n_segments, seg, DTYPE) + offs, mask=inb, other=0)
    x = x.to(tl.float32)
    if MAGNITUDE:
        x = tl.abs(x)
    bits = x.to(tl.uint32, bitcast=True)
    bits = tl.where(bits == 0x80000000, 0, bits)  # -0.0 ranks as +0.0, as comparisons do
    key = tl.where((bits & 0x80000000) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    key64 = key.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    # An ALL_ELIGIBLE segment's row points at its output: read, never used.
    elig = tile_bits(
        segment_ptr(addrs_ptr, _ELIGIBLE, n_segments, seg, tl.uint8), byte_offs, row_inb
    )
    ok = inb & ((mode == 0) | ((mode == 1) & (elig != 0)) | ((mode == 2) & (elig == 0)))
    return key64, ok, byte_offs, row_inb


@triton.jit(do_not_specialize=["n_segments", "shift"])
def _histogram_kernel(
    addrs_ptr,
    n_segments,
    chunks_ptr,
    numels_ptr,
    modes_ptr,
    prefix_ptr,
    hist_ptr,
    shift,
    DIGIT_BITS: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    DTYPE: tl.constexpr,
    MAGNITUDE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
):
    """Histogram of digit ``(key >> shift) & (2**DIGIT_BITS - 1)`` of the chunk's eligible keys
    whose higher bits equal the segment's prefix, added into the segment's row of ``hist``."""
    NUM_BINS: tl.constexpr = 1 << DIGIT_BITS
    _pid, seg, chunk_start, n = load_chunk(chunks_ptr, numels_ptr, BLOCK * CHUNK_BLOCKS)
    mode = tl.load(modes_ptr + seg)
    prefix = tl.load(prefix_ptr + seg)
    counts = tl.zeros([NUM_BINS], dtype=tl.int32)
    for i in range(CHUNK_BLOCKS):
        key, ok, _bytes, _rows = _tile_keys(
            addrs_ptr, n_segments, seg, chunk_start + i * BLOCK, n, mode, DTYPE, MAGNITUDE, BLOCK
        )
        if HAS_PREFIX:
            ok = ok & ((key >> (shift + DIGIT_BITS)) == prefix)
        digit = ((key >> shift) & (NUM_BINS - 1)).to(tl.int32)
        counts += tl.histogram(tl.reshape(digit, [BLOCK]), NUM_BINS, mask=tl.reshape(ok, [BLOCK]))
    tl.atomic_add(hist_ptr + seg * NUM_BINS + tl.arange(0, NUM_BINS), counts)


@triton.jit(do_not_specialize=["n_segments"])
def _pick_bin_kernel(
    state_ptr,
    hist_ptr,
    n_segments,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
):
    """One program per segment, after a histogram pass: the bin holding the segment's k-th key
    extends its prefix by one digit, and the count of keys above that bin is carried on.

    The first pass also caps ``k`` at the eligible count (a ``k`` above it takes them all); the
    last turns the prefix into the k-th key (``_NO_KEY`` for ``k = 0``), so nothing between
    the passes runs on the host."""
    NUM_BINS: tl.constexpr = 1 << DIGIT_BITS
    seg = tl.program_id(0)
    counts = tl.load(hist_ptr + seg * NUM_BINS + tl.arange(0, NUM_BINS)).to(tl.int64)
    k = tl.load(state_ptr + _K * n_segments + seg)
    above = tl.load(state_ptr + _ABOVE * n_segments + seg)
    prefix = tl.load(state_ptr + _PREFIX * n_segments + seg)
    total = tl.sum(counts, 0)
    if FIRST:
        k = tl.minimum(k, total)
        tl.store(state_ptr + _K * n_segments + seg, k)
    # Keys at or above each bin; the k-th lies in the highest bin where that count reaches k.
    at_least = above + total - tl.cumsum(counts, 0) + counts
    bins = tl.arange(0, NUM_BINS)
    chosen = tl.max(tl.where(at_least >= k, bins, 0), 0)
    above += tl.sum(tl.where(bins > chosen, counts, 0), 0)
    prefix = (prefix << DIGIT_BITS) | chosen
    if LAST:
        prefix = tl.where(k > 0, prefix, _NO_KEY)
    tl.store(state_ptr + _ABOVE * n_segments + seg, above)
    tl.store(state_ptr + _PREFIX * n_segments + seg, prefix)


@triton.jit(do_not_specialize=["n_segments"])
def _tie_count_kernel(
    addrs_ptr,
    n_segments,
    chunks_ptr,
    numels_ptr,
    modes_ptr,
    kth_ptr,
    ties_ptr,
    LOW_BITS: tl.constexpr,
    DTYPE: tl.constexpr,
    MAGNITUDE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
):
    """How many eligible keys of the chunk equal its segment's k-th key (both without their
    ``LOW_BITS`` lowest bits)."""
    pid, seg, chunk_start, n = load_chunk(chunks_ptr, numels_ptr, BLOCK * CHUNK_BLOCKS)
    mode = tl.load(modes_ptr + seg)
    kth = tl.load(kth_ptr + seg)
    ties = tl.zeros((), dtype=tl.int32)
    for i in range(CHUNK_BLOCKS):
        key, ok, _bytes, _rows = _tile_keys(
            addrs_ptr, n_segments, seg, chunk_start + i * BLOCK, n, mode, DTYPE, MAGNITUDE, BLOCK
        )
        ties += tl.sum(tl.sum((ok & ((key >> LOW_BITS) == kth)).to(tl.int32), 1), 0)
    tl.store(ties_ptr + pid, ties)


@triton.jit(do_not_specialize=["n_segments"])
def _write_bits_kernel(
    addrs_ptr,
    n_segments,
    chunks_ptr,
    numels_ptr,
    modes_ptr,
    kth_ptr,
    needed_ptr,
    ties_before_ptr,
    LOW_BITS: tl.constexpr,
    DTYPE: tl.constexpr,
    MAGNITUDE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
):
    """The chunk's bytes of its segment's packed output: above the k-th key, or a tie whose rank
    among the segment's ties is below ``needed`` (keys compared without their ``LOW_BITS``)."""
    pid, seg, chunk_start, n = load_chunk(chunks_ptr, numels_ptr, BLOCK * CHUNK_BLOCKS)
    mode = tl.load(modes_ptr + seg)
    kth = tl.load(kth_ptr + seg)
    needed = tl.load(needed_ptr + seg)
    rank0 = tl.load(ties_before_ptr + pid)  # ties of this segment before this chunk
    out_ptr = segment_ptr(addrs_ptr, _OUT, n_segments, seg, tl.uint8)
    for i in range(CHUNK_BLOCKS):
        key, ok, byte_offs, row_inb = _tile_keys(
            addrs_ptr, n_segments, seg, chunk_start + i * BLOCK, n, mode, DTYPE, MAGNITUDE, BLOCK
        )
        key = key >> LOW_BITS
        tie = (ok & (key == kth)).to(tl.int64)
        row_ties = tl.sum(tie, 1)
        # Exclusive rank of each tie in index order: earlier chunks, earlier rows, earlier columns.
        rank = rank0 + (tl.cumsum(row_ties, 0) - row_ties)[:, None] + tl.cumsum(tie, 1) - tie
        chosen = (ok & (key > kth)) | ((tie != 0) & (rank < needed))
        tl.store(out_ptr + byte_offs, pack_tile(chosen), mask=row_inb)
        rank0 += tl.sum(row_ties, 0)


def topk_bits_triton(
    scores: Sequence[torch.Tensor],
    ks: Sequence[int],
    eligible: Sequence[tuple[torch.Tensor, bool] | None],
    magnitude: bool = False,
    key_bits: int = 32,
) -> list[torch.Tensor]:
    """The Triton path of :func:`resu_compile.kernels.segmented_topk.topk_bits` (one device and
    dtype for all ``scores``); see there."""
    n_seg = len(scores)
    device = scores[0].device
    numels = [s.numel() for s in scores]
    outs = [torch.empty(packed_numel(n), dtype=torch.uint8, device=device) for n in numels]
    modes = [
        ALL_ELIGIBLE if e is None else ELIGIBLE_WHERE_SET if e[1] else ELIGIBLE_WHERE_CLEAR
        for e in eligible
    ]
    elig_bits = [out if e is None else e[0] for e, out in zip(eligible, outs, strict=True)]
    addrs = address_table([scores, elig_bits, outs], device)
    # Mode and k per segment; the running count above and the prefix start at 0: one copy.
    zeros = [0] * n_seg
    rows = [modes, [max(0, int(k)) for k in ks], zeros, zeros]
    state = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    modes_dev, kth = state[0], state[3]  # kth: the prefix, the k-th key after the last pass
    tables = chunk_tables(numels, device)
    common = {"DTYPE": TL_DTYPES[scores[0].dtype], "MAGNITUDE": magnitude}
    launch = {"BLOCK": BLOCK, "CHUNK_BLOCKS": CHUNK_BLOCKS, "num_warps": NUM_WARPS}
    head = (addrs, n_seg, tables.chunks, tables.numels, modes_dev)

    passes = key_bits // DIGIT_BITS
    hists = torch.zeros(passes, n_seg, 1 << DIGIT_BITS, dtype=torch.int32, device=device)
    for i, hist in enumerate(hists):
        _histogram_kernel[tables.grid](
            *head, kth, hist, 32 - (i + 1) * DIGIT_BITS, DIGIT_BITS=DIGIT_BITS,
            HAS_PREFIX=i > 0, **common, **launch,
        )  # fmt: skip
        _pick_bin_kernel[(n_seg,)](
            state, hist, n_seg, FIRST=i == 0, LAST=i == passes - 1, DIGIT_BITS=DIGIT_BITS
        )
    needed = state[1] - state[2]  # ties at the k-th key to take: k minus the count above it

    ties = torch.empty(tables.grid[0], dtype=torch.int64, device=device)
    low_bits = 32 - key_bits
    _tie_count_kernel[tables.grid](*head, kth, ties, LOW_BITS=low_bits, **common, **launch)
    before = torch.cumsum(ties, 0) - ties
    ties_before = before - before[tables.first_chunk]
    _write_bits_kernel[tables.grid](
        *head, kth, needed, ties_before, LOW_BITS=low_bits, **common, **launch
    )
    return outs
