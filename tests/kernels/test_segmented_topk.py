"""Segmented exact top-k: bit for bit ``pack_bits(topk_mask(...))`` for every segment at once."""

from __future__ import annotations

import itertools

import pytest
import torch

from resu_compile.kernels.bits import unpack_bits
from resu_compile.kernels.segmented_topk import topk_bits, topk_bits_reference, truncated_keys
from resu_compile.kernels.triton.segmented_topk import topk_bits_triton
from tests.kernels.segment_cases import (
    DEVICES,
    DTYPES,
    GPU_DTYPES,
    MASK_KINDS,
    SHAPES,
    generator,
    mask_bits,
)

SCORE_KINDS = ("normal", "heavy_ties", "signed_zeros")


def _scores(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = generator(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g)
    if kind == "heavy_ties":  # few distinct values: the k-th value is shared by many
        return torch.randint(-2, 3, shape, generator=g).float()
    if kind == "signed_zeros":  # -0.0 must rank with +0.0
        values = torch.randn(shape, generator=g)
        values[values.abs() < 0.5] = 0.0
        values[values.abs() > 1.5] = -0.0
        return values
    raise AssertionError(kind)


def _check(device: str, scores, ks, eligible, magnitude: bool, key_bits: int = 32) -> None:
    """The Triton path (interpreted on the CPU, compiled on the GPU) against the reference."""
    run = topk_bits_triton if device == "cpu" else topk_bits
    found = run(scores, ks, eligible, magnitude=magnitude, key_bits=key_bits)
    for i, (s, k, e) in enumerate(zip(scores, ks, eligible, strict=True)):
        host_e = None if e is None else (e[0].cpu(), e[1])
        expected = topk_bits_reference(s.cpu(), k, host_e, magnitude, key_bits)
        assert torch.equal(found[i].cpu(), expected), (i, tuple(s.shape), k, e and e[1])


def _cases(device: str, dtype: torch.dtype, kind: str):
    """One segment per (shape, mask, polarity, k): k from none to more than the eligible count."""
    scores, ks, eligible = [], [], []
    cases = itertools.product(SHAPES, MASK_KINDS, (True, False), (0.0, 0.3, 1.0, 1.5))
    for i, (shape, mask_kind, where_set, fraction) in enumerate(cases):
        s = _scores(kind, shape, i).to(device=device, dtype=dtype)
        scores.append(s)
        ks.append(int(fraction * s.numel() / 2) + (fraction > 0))
        eligible.append((mask_bits(shape, mask_kind, i, device), where_set))
    return scores, ks, eligible


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", SCORE_KINDS)
def test_matches_topk_mask(device: str, kind: str) -> None:
    _check(device, *_cases(device, torch.float32, kind), magnitude=False)


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_magnitudes(device: str) -> None:
    """Scores read in their own dtype, ``|x|`` taken in the kernel (how a weight scores itself)."""
    for dtype in DTYPES[1:] if device == "cpu" else GPU_DTYPES[1:]:
        _check(device, *_cases(device, dtype, "normal"), magnitude=True)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_across_chunks_and_all_eligible(device: str) -> None:
    """Ties spread over many chunks must be taken in index order across chunk boundaries."""
    scores = [
        _scores("heavy_ties", (40_000,), 1).to(device),
        _scores("normal", (129, 257), 2).to(device),
    ]
    eligible = [None, (mask_bits((129, 257), "random", 3, device), True)]
    _check(device, scores, [17_003, 5_000], eligible, magnitude=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("key_bits", "magnitude"), [(16, True), (8, False)])
def test_truncated_keys_match_the_top_k_of_truncated_scores(
    device: str, key_bits: int, magnitude: bool
) -> None:
    """Fewer histogram passes: exactly k chosen, ranked by the top bits of the key only."""
    _check(device, *_cases(device, torch.float32, "normal"), magnitude, key_bits)


def test_truncated_keys_tie_what_bfloat16_truncation_ties() -> None:
    values = torch.tensor([1.0, 1.0 + 2**-10, 1.0 + 2**-6, -0.0, 0.0, -1.0, -1.0 - 2**-10])
    keys = truncated_keys(values, 16)
    assert keys[0] == keys[1] < keys[2]  # 2**-10 is below bf16's last mantissa bit
    assert keys[3] == keys[4] > keys[5] == keys[6]
    chosen = unpack_bits(topk_bits_reference(values, 2, key_bits=16), values.shape)
    assert chosen.tolist() == [True, False, True, False, False, False, False]  # ties by index
    assert int(chosen.sum()) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpt2_sized_layers_gpu(dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = [
        (torch.randn(shape, generator=g, device="cuda") * 3).round().to(dtype)
        for shape in [(2304, 768), (768, 768), (3072, 768)]
    ]
    eligible = [
        (mask_bits(tuple(s.shape), "random", i, "cuda"), True) for i, s in enumerate(scores)
    ]
    _check("cuda", scores, [s.numel() // 5 for s in scores], eligible, magnitude=True)
    _check("cuda", scores, [s.numel() // 5 for s in scores], eligible, True, key_bits=16)


def test_dispatch_uses_the_reference_off_the_gpu() -> None:
    scores = [torch.randn(100, generator=generator(0)), torch.empty(0)]
    found = topk_bits(scores, [10, 0])
    assert torch.equal(found[0], topk_bits_reference(scores[0], 10))
    assert found[1].numel() == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one entry per tensor"):
        topk_bits([torch.randn(4)], [1, 2])
    with pytest.raises(ValueError, match="scores\\[0\\]"):
        topk_bits([torch.arange(4)], [1])
    with pytest.raises(ValueError, match="key_bits must be one of"):
        topk_bits([torch.randn(4)], [1], key_bits=12)
    with pytest.raises(ValueError, match="eligible\\[0\\]"):
        topk_bits([torch.randn(16)], [1], [(torch.zeros(1, dtype=torch.uint8), True)])
