"""Sort-free top-k threshold: radix refinement of histograms over the float bit patterns.

Selective RESU (METHOD.md section 4) needs "the k largest scores" every step or every few steps;
sorting millions of scores for that is the slowest thing in the phase. Instead, map each float to
its order-preserving unsigned key and find the k-th largest key digit by digit: each pass
histograms one digit of the keys that share the prefix found so far, then descends into the bin
holding the k-th largest. Passes stop as soon as a bin edge gives a count within 1% of k; the last
pass resolves every bit, so the result is either within 1% of k or the exact k-th largest value
(which, with ties, may count more). Each pass reads the scores once and syncs with the host once.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from resu_compile.kernels.reference import topk_threshold

MIN_NUMEL = 4096
REL_TOL = 0.01
BLOCK = 4096
NUM_WARPS = 8

# Digit widths per pass: 2048 / 2048 / 1024 bins cover a float32 key, 256 / 256 a 16-bit one.
_PASSES = {32: (11, 11, 10), 16: (8, 8)}
_KEY_BITS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}
_INT_VIEW = {32: torch.int32, 16: torch.int16}


@triton.jit
def _radix_histogram_kernel(
    raw_ptr,
    hist_ptr,
    n,
    iters,
    prefix,
    shift,
    KEY_BITS: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Histogram of digit ``(key >> shift) & (2**DIGIT_BITS - 1)`` over keys whose higher bits equal
    ``prefix``; a grid-stride loop keeps one register histogram per program and one atomic flush."""
    NUM_BINS: tl.constexpr = 1 << DIGIT_BITS
    SIGN: tl.constexpr = 1 << (KEY_BITS - 1)
    ALL_ONES: tl.constexpr = (1 << KEY_BITS) - 1
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    counts = tl.zeros([NUM_BINS], dtype=tl.int32)
    for i in range(iters):
        offs = (i * num_programs + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        raw = tl.load(raw_ptr + offs, mask=inb, other=0)
        if KEY_BITS == 32:
            bits = raw.to(tl.uint32, bitcast=True)
        else:
            bits = raw.to(tl.uint16, bitcast=True).to(tl.uint32)
        bits = tl.where(bits == SIGN, 0, bits)  # -0.0 counts as +0.0, as comparisons do
        key = tl.where((bits & SIGN) != 0, bits ^ ALL_ONES, bits | SIGN)
        keep = inb
        if HAS_PREFIX:
            keep = keep & ((key >> (shift + DIGIT_BITS)) == prefix)
        digit = ((key >> shift) & (NUM_BINS - 1)).to(tl.int32)
        counts += tl.histogram(digit, NUM_BINS, mask=keep)
    tl.atomic_add(hist_ptr + tl.arange(0, NUM_BINS), counts)


def _value_to_key(value: float, dtype: torch.dtype) -> int:
    """The order-preserving unsigned key of ``value`` in ``dtype`` (the kernel's mapping)."""
    key_bits = _KEY_BITS[dtype]
    sign, all_ones = 1 << (key_bits - 1), (1 << key_bits) - 1
    bits = int(torch.tensor([value], dtype=dtype).view(_INT_VIEW[key_bits])) & all_ones
    bits = 0 if bits == sign else bits
    return bits ^ all_ones if bits & sign else bits | sign


def _key_to_value(key: int, dtype: torch.dtype) -> float:
    """Inverse of :func:`_value_to_key`; exact, since every fp32/fp16/bf16 value is a double."""
    key_bits = _KEY_BITS[dtype]
    sign, all_ones = 1 << (key_bits - 1), (1 << key_bits) - 1
    bits = key ^ sign if key & sign else key ^ all_ones
    signed = bits - (1 << key_bits) if bits & sign else bits
    return torch.tensor([signed], dtype=_INT_VIEW[key_bits]).view(dtype).item()


def _grid_size(values: torch.Tensor, blocks: int) -> int:
    """Enough programs to fill the GPU, few enough that flushing their histograms is cheap."""
    if values.is_cuda:
        sms = torch.cuda.get_device_properties(values.device).multi_processor_count
        return min(blocks, 4 * sms)
    return min(blocks, 4)


def _histogram(
    raw: torch.Tensor, key_bits: int, digit_bits: int, prefix: int, shift: int, first: bool
) -> np.ndarray:
    n = raw.numel()
    blocks = triton.cdiv(n, BLOCK)
    grid = _grid_size(raw, blocks)
    hist = torch.zeros(1 << digit_bits, dtype=torch.int32, device=raw.device)
    _radix_histogram_kernel[(grid,)](
        raw,
        hist,
        n,
        triton.cdiv(blocks, grid),
        prefix,
        shift,
        KEY_BITS=key_bits,
        DIGIT_BITS=digit_bits,
        HAS_PREFIX=not first,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return hist.cpu().numpy().astype(np.int64)


def topk_threshold_approx(values: torch.Tensor, k: int) -> float:
    """A threshold ``t`` with ``count(values >= t)`` within 1% of ``k``, found without sorting.

    ``t`` is a value of ``values``' dtype (so comparing against it is exact), usually a bin edge
    rather than an element. Tensors under ``MIN_NUMEL`` elements, and dtypes other than fp32, fp16
    and bf16, use the exact :func:`reference.topk_threshold`. NaNs are not supported.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"topk_threshold_approx: k must be in [1, {n}], got {k}")
    if n < MIN_NUMEL or flat.dtype not in _KEY_BITS:
        return topk_threshold(flat, k)
    dtype = flat.dtype
    key_bits = _KEY_BITS[dtype]
    raw = flat.contiguous().view(_INT_VIEW[key_bits])
    tol = REL_TOL * k
    # Keys below that of -inf are NaN bit patterns: a lower bin edge must not land there.
    min_key = _value_to_key(float("-inf"), dtype)
    prefix, above, consumed = 0, 0, 0
    for digit_bits in _PASSES[key_bits]:
        shift = key_bits - consumed - digit_bits
        hist = _histogram(raw, key_bits, digit_bits, prefix, shift, first=consumed == 0)
        # Bins from the top down; the k-th largest lies in the first one where the count reaches k.
        at_least = above + np.cumsum(hist[::-1])
        j = int(np.searchsorted(at_least, k))
        b = len(hist) - 1 - j
        count_above_bin = above if j == 0 else int(at_least[j - 1])
        count_from_bin = int(at_least[j])
        # t at the bin's lower edge gives count_from_bin, at its upper edge count_above_bin.
        edge = ((prefix << digit_bits) | b) << shift
        over, under = count_from_bin - k, k - count_above_bin
        if shift == 0 or min(over, under) <= tol:
            if under < over and under <= tol:
                return _key_to_value(edge + (1 << shift), dtype)
            # Once shift == 0 the lower edge is the exact k-th largest value.
            return _key_to_value(max(edge, min_key), dtype)
        prefix, above, consumed = (prefix << digit_bits) | b, count_above_bin, consumed + digit_bits
    raise AssertionError("unreachable: the last pass resolves every bit")


def count_at_least(values: torch.Tensor, t: float) -> int:
    """``count(values >= t)``: what a caller checks a threshold against."""
    return int((values >= t).sum())
