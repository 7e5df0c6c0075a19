"""Shared inputs and comparisons of the update-kernel tests (masked SGD / Adam, theta).

Values of a kernel and its reference agree to rounding (fp32 math in both; the reference rounds
16-bit tensors once, as the kernels do); invariants hold exactly: pruned coordinates end at 0 in
the parameter and every state, unselected ones keep their bits.
"""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels.bits import pack_bits

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CPU_DTYPES = [torch.float32, torch.float16]
# Per-weight cases: (5, 37, 23) and (3, 1500) span several programs and end on a partial block and
# a partial byte.
SHAPES = [(5, 37, 23), (1, 1), (3, 1500)]
MASKS = ["none", "all_active", "all_pruned", "random"]
# Lists of weights: partial blocks and bytes, a single weight, several blocks; not all multiples of
# 16, so the kernels run without the alignment hints. ALIGNED_SHAPES take the hinted path.
ODD_SHAPES = [(5, 37), (1, 1), (3, 1500), (64, 64)]
ALIGNED_SHAPES = [(64, 64), (16, 48), (3, 1504)]
GPU_SHAPES = [*ODD_SHAPES, (768, 2304), (3072, 768), (1024, 4097)]
THETA_KW = dict(lr=1e-2, step=2, beta1=0.8, weight_decay=1e-2)


def mask(kind: str, shape: tuple[int, ...], device: str) -> torch.Tensor | None:
    """A mask of one of ``MASKS`` (``none``: no mask at all)."""
    if kind == "none":
        return None
    if kind == "all_active":
        return torch.ones(shape, dtype=torch.bool, device=device)
    if kind == "all_pruned":
        return torch.zeros(shape, dtype=torch.bool, device=device)
    gen = torch.Generator().manual_seed(7)
    return (torch.rand(shape, generator=gen) < 0.5).to(device)


def tensors(shape, dtype, device, active: torch.Tensor | None, count: int) -> list[torch.Tensor]:
    """param, grad, then ``count - 2`` states: random everywhere (pruned state must be re-zeroed),
    with a NaN gradient on pruned coordinates (it must be ignored)."""
    gen = torch.Generator().manual_seed(0)
    out = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(count)]
    if count > 3:
        out[3] = out[3].abs()  # a second moment is non-negative
    if active is not None:
        out[1] = out[1].masked_fill(~active, float("nan"))
    return out


def assert_pruned_zero(values: list[torch.Tensor], active: torch.Tensor | None) -> None:
    if active is None:
        return
    for t in values:
        assert torch.equal(t[~active], torch.zeros_like(t[~active]))


def bools(kind: str, shapes, device: str, seed: int = 7) -> list[torch.Tensor]:
    """One bool tensor per shape: ``all``, ``none`` or ``random`` (30% set)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if kind == "all":
            out.append(torch.ones(shape, dtype=torch.bool))
        elif kind == "none":
            out.append(torch.zeros(shape, dtype=torch.bool))
        else:
            out.append(torch.rand(shape, generator=gen) < 0.3)
    return [b.to(device) for b in out]


def masks(kind: str, shapes, device: str):
    """(bool masks, packed bits) of a list of weights, or (None, None) for ``none``."""
    if kind == "none":
        return None, None
    found = bools("random", shapes, device, seed=3)
    return found, [pack_bits(m) for m in found]


def lists(shapes, dtype, device, count: int) -> list[list[torch.Tensor]]:
    """``count`` lists (param, grad, states...) of random tensors; the 4th, a second moment, >= 0."""
    gen = torch.Generator().manual_seed(0)
    out = [
        [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
        for _ in range(count)
    ]
    if count > 3:
        out[3] = [t.abs() for t in out[3]]
    return out


def clone(rows):
    return [[t.clone() for t in row] for row in rows]


def at(rows, i: int) -> list[torch.Tensor]:
    return [row[i] for row in rows]


def assert_lists_close(got, want, dtype) -> None:
    for got_row, want_row in zip(got, want, strict=True):
        for a, b in zip(got_row, want_row, strict=True):
            torch.testing.assert_close(a, b, **TOL[dtype])


def assert_lists_equal(got, want) -> None:
    for got_row, want_row in zip(got, want, strict=True):
        for a, b in zip(got_row, want_row, strict=True):
            assert torch.equal(a, b)


def assert_lists_bitwise_equal(got, want) -> None:
    for got_row, want_row in zip(got, want, strict=True):
        for a, b in zip(got_row, want_row, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
