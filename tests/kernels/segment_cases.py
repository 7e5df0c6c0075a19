"""Shared inputs of the transition-kernel tests: segments of odd sizes and masks of every kind."""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels.bits import pack_bits

# Odd shapes: a 5x37x23 tensor, sizes that end mid-byte and mid-chunk, one smaller than a byte.
SHAPES = [(5, 37, 23), (2_011,), (3,), (33, 65)]
MASK_KINDS = ("random", "all_active", "all_pruned")
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]
# bf16 only on the GPU: the interpreter rounds fp32 -> bf16 by truncation, the GPU to nearest.
DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mask(shape: tuple[int, ...], kind: str, seed: int, density: float = 0.5) -> torch.Tensor:
    if kind == "all_active":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "all_pruned":
        return torch.zeros(shape, dtype=torch.bool)
    return torch.rand(shape, generator=generator(seed)) < density


def mask_bits(shape: tuple[int, ...], kind: str, seed: int, device: str) -> torch.Tensor:
    return pack_bits(mask(shape, kind, seed)).to(device)
