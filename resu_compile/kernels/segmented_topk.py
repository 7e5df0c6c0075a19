"""Exact top-k masks of many tensors in a handful of launches: segmented radix select, packed bits.

Every transition (prune, RESU entry, amnesty) asks, for each managed weight, for the mask of its
``k`` largest eligible scores, ties broken by the lower index (``method.topk.topk_mask``). Asked one
weight at a time that is ~30 PyTorch kernels per weight, and the transitions of a 48-weight model
pay more in launches and in ``torch.topk``'s own passes than in reading the scores. Here all
weights are *segments* of one problem, and the answer comes back as packed bits (the mask format of
:mod:`resu_compile.kernels.bits`), so nothing is unpacked or re-packed:

1. Histogram passes find every segment's k-th largest key, 8 bits at a time (keys are the
   order-preserving ``uint32`` images of the fp32 scores): four for the exact key, fewer for a key
   of ``key_bits`` (below). One launch per pass serves every segment, and after each a launch of
   one program per segment picks the segment's bin from the ``[segments, 256]`` histogram, so
   nothing waits for the host and the host issues two launches a pass.
2. One pass counts, per chunk, the ties at the k-th key; an exclusive scan gives each chunk the
   number of ties before it within its segment.
3. One pass writes the packed bits: a score above the k-th key is chosen, a tie is chosen while its
   rank among the segment's ties (in index order) is below ``k`` minus the count above.

The kernels (:mod:`resu_compile.kernels.triton.segmented_topk`) read a segment's scores where they
live, through a table of base addresses; ``magnitude=True`` takes ``|x|`` so a weight can be its
own score. Eligibility is a packed bit tensor per segment, eligible where the bit is set or where
it is clear; ineligible coordinates are never chosen, and a ``k`` above the eligible count takes
every eligible one.
Scores must not be NaN (callers pass finite scores, as ``topk_mask`` requires).

``key_bits=16`` ranks by the top 16 bits of each key, which for magnitudes is the score truncated
to bfloat16: two passes instead of four, still exactly ``k`` chosen, the ties of the truncated
score taken in index order. That is the exact top-k of the truncated scores, for selections whose
rule allows a threshold found to within a relative 2**-7 (the consistency mode's per-step top-k,
METHOD.md section 4); transitions keep the exact key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resu_compile.kernels.bits import pack_bits, packed_numel, unpack_bits
from resu_compile.kernels.launch import FLOAT_DTYPES, on_gpu
from resu_compile.method.sharded_topk import order_keys
from resu_compile.method.topk import topk_mask

#: The key widths :func:`topk_bits` ranks by: whole 8-bit digits of the 32-bit key.
KEY_BITS = (8, 16, 24, 32)


def topk_bits(
    scores: Sequence[torch.Tensor],
    ks: Sequence[int],
    eligible: Sequence[tuple[torch.Tensor, bool] | None] | None = None,
    magnitude: bool = False,
    key_bits: int = 32,
) -> list[torch.Tensor]:
    """Packed bits of the ``ks[i]`` largest eligible entries of each ``scores[i]``.

    ``eligible[i]`` is ``None`` (every entry) or ``(bits, where_set)``: packed bits of
    ``scores[i]``'s size, eligible where a bit is set (``where_set``) or where it is clear. With
    ``magnitude`` the scores are ``|scores[i]|``. Ties go to the lower flat index and a ``k`` above
    the eligible count takes them all: bit for bit ``pack_bits(topk_mask(...))``, which is what
    runs off the GPU (and what the kernels are tested against). ``key_bits`` (8, 16, 24 or 32):
    rank by the top bits of each score's key only (see the module's docstring).
    """
    if key_bits not in KEY_BITS:
        raise ValueError(f"topk_bits: key_bits must be one of {KEY_BITS}, got {key_bits!r}")
    eligible = [None] * len(scores) if eligible is None else list(eligible)
    if not len(scores) == len(ks) == len(eligible):
        raise ValueError("topk_bits: scores, ks and eligible need one entry per tensor")
    for i, (s, e) in enumerate(zip(scores, eligible, strict=True)):
        if s.dtype not in FLOAT_DTYPES:
            raise ValueError(f"topk_bits: scores[{i}] must be an fp32, fp16 or bf16 tensor")
        if e is not None and (e[0].dtype != torch.uint8 or e[0].numel() != packed_numel(s.numel())):
            raise ValueError(f"topk_bits: eligible[{i}] must hold ceil(numel / 8) uint8 bytes")
    out: list[torch.Tensor | None] = [None] * len(scores)
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, s in enumerate(scores):
        if s.numel() == 0 or not on_gpu([s]):
            out[i] = topk_bits_reference(s, ks[i], eligible[i], magnitude, key_bits)
        else:
            by_kind.setdefault((s.device, s.dtype), []).append(i)
    if by_kind:
        from resu_compile.kernels.triton.segmented_topk import topk_bits_triton

        for indices in by_kind.values():
            found = topk_bits_triton(
                [scores[i].contiguous() for i in indices],
                [ks[i] for i in indices],
                [eligible[i] for i in indices],
                magnitude,
                key_bits,
            )
            for i, bits in zip(indices, found, strict=True):
                out[i] = bits
    return out  # type: ignore[return-value]


def topk_bits_reference(
    scores: torch.Tensor,
    k: int,
    eligible: tuple[torch.Tensor, bool] | None = None,
    magnitude: bool = False,
    key_bits: int = 32,
) -> torch.Tensor:
    """:func:`topk_bits` for one tensor: ``topk_mask``, packed (the CPU path and the oracle)."""
    values = scores.abs() if magnitude else scores
    if key_bits < 32:
        values = truncated_keys(values, key_bits)
    allowed = None
    if eligible is not None:
        bits = unpack_bits(eligible[0], scores.shape)
        allowed = bits if eligible[1] else ~bits
    return pack_bits(topk_mask(values, k, eligible=allowed))


def truncated_keys(values: torch.Tensor, key_bits: int) -> torch.Tensor:
    """The top ``key_bits`` (< 32) of each value's order-preserving key (the kernels' key,
    :func:`~resu_compile.method.sharded_topk.order_keys`), as exact fp32 integers of ``values``'
    shape: they order as the values do, and values that share them tie."""
    return (order_keys(values) >> (32 - key_bits)).float().reshape(values.shape)
