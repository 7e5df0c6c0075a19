"""The transition kernels other than top-k, each against its reference: zeroing where a mask bit
is clear, RESU entry's sigma and theta, and the commit's bit algebra and counts."""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels import commit_bits as commit
from resu_compile.kernels import theta_entry
from resu_compile.kernels.bits import pack_bits
from resu_compile.kernels.masked_zero import zero_where_clear_, zero_where_clear_reference_
from resu_compile.kernels.triton import commit_bits as commit_triton
from resu_compile.kernels.triton import theta_entry as theta_entry_triton
from resu_compile.kernels.triton.masked_zero import zero_where_clear_triton_
from tests.kernels.segment_cases import DEVICES, DTYPES, GPU_DTYPES, MASK_KINDS, SHAPES, mask

CASES = [(shape, kind) for shape in SHAPES for kind in MASK_KINDS]


def _dtypes(device: str) -> list[torch.dtype]:
    return DTYPES if device == "cpu" else GPU_DTYPES


def _weights(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=g) * 0.2 + 0.1).to(device, dtype) for shape, _ in CASES]


def _bits(device: str, seed: int = 0, density: float = 0.5) -> list[torch.Tensor]:
    return [
        pack_bits(mask(shape, kind, seed + i, density)).to(device)
        for i, (shape, kind) in enumerate(CASES)
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_zero_where_clear(device: str) -> None:
    for dtype in _dtypes(device):
        found, expected, bits = _weights(device, dtype), _weights(device, dtype), _bits(device)
        if device == "cpu":
            zero_where_clear_triton_(found, bits, dtype)
        else:
            zero_where_clear_(found, bits)
        for tensor, packed in zip(expected, bits, strict=True):
            zero_where_clear_reference_(tensor, packed)
        assert all(torch.equal(a, b) for a, b in zip(found, expected, strict=True))


def test_zero_where_clear_non_contiguous_takes_the_reference() -> None:
    weight = torch.randn(6, 10).t()  # (10, 6), not contiguous
    bits = pack_bits(mask((10, 6), "random", 1))
    expected = weight.clone()
    zero_where_clear_reference_(expected, bits)
    zero_where_clear_([weight], [bits])
    assert torch.equal(weight, expected)
    with pytest.raises(ValueError, match="bits\\[0\\]"):
        zero_where_clear_([weight], [bits[:-1]])


@pytest.mark.parametrize("device", DEVICES)
def test_active_sigma(device: str) -> None:
    """The unbiased std of the active weights, 0 with fewer than two active."""
    for dtype in _dtypes(device):
        weights, bits = _weights(device, dtype), _bits(device)
        active = [int(mask(s, k, i).sum()) for i, (s, k) in enumerate(CASES)]
        run = (
            theta_entry_triton.active_sigma_triton if device == "cpu" else theta_entry.active_sigma
        )
        found = run(weights, bits, active).cpu()
        expected = torch.stack(
            [
                w.float()[mask(s, k, i)].std() if active[i] > 1 else torch.tensor(0.0)
                for i, (w, (s, k)) in enumerate(zip([w.cpu() for w in weights], CASES, strict=True))
            ]
        )
        torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_write_theta(device: str) -> None:
    """W = where(S, scale * noise, where(M, W, 0)), bit for bit."""
    for dtype in _dtypes(device):
        found, expected = _weights(device, dtype), _weights("cpu", dtype)
        masks, selections = _bits(device, 0), _bits(device, 100, density=0.2)
        g = torch.Generator().manual_seed(3)
        noise = [torch.randn(w.shape, generator=g).to(device) for w in found]
        scale = torch.rand(len(found), generator=g).to(device)
        if device == "cpu":
            theta_entry_triton.write_theta_triton_(found, masks, selections, noise, scale)
        else:
            theta_entry.write_theta_(found, masks, selections, noise, scale)
        host = [t.cpu() for t in expected]
        theta_entry.write_theta_(  # on the CPU: the reference, weight by weight
            host,
            [b.cpu() for b in masks],
            [b.cpu() for b in selections],
            [n.cpu() for n in noise],
            scale.cpu(),
        )
        assert all(torch.equal(a.cpu(), b) for a, b in zip(found, host, strict=True)), dtype


@pytest.mark.parametrize("device", DEVICES)
def test_commit_bits(device: str) -> None:
    numels = [torch.Size(shape).numel() for shape, _ in CASES]
    old, new, trained, revived = (_bits(device, seed) for seed in (0, 50, 100, 150))
    run = (
        commit.CommitBits(*commit_triton.commit_bits_triton(old, new, trained, revived, numels))
        if device == "cpu"
        else commit.commit_bits(old, new, trained, revived, numels)
    )
    expected = commit.commit_bits_reference(
        *([t.cpu() for t in row] for row in (old, new, trained, revived))
    )
    assert torch.equal(run.counts.cpu(), expected.counts)
    for a, b in zip(
        run.keep_state + run.revived, expected.keep_state + expected.revived, strict=True
    ):
        assert torch.equal(a.cpu(), b)


def test_revived_bits_reach_the_device_from_one_buffer_or_one_by_one() -> None:
    """After a commit the revived bits are slices of one host buffer and cross as one copy; bits
    from a checkpoint (separate tensors) or absent ones (zeros) give the same result."""
    from types import SimpleNamespace

    from resu_compile.runtime.transitions import _one_buffer, _revived_on_device, _store_revived

    g = torch.Generator().manual_seed(3)
    parts = [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for n in (5, 1, 12)]
    weights = [SimpleNamespace(revived_bits=None) for _ in parts]
    _store_revived(weights, parts)  # type: ignore[arg-type]
    stored = [w.revived_bits for w in weights]
    assert _one_buffer(stored, [5, 1, 12]) is not None
    assert _one_buffer(stored, [5, 1, 11]) is None
    old_bits = [torch.zeros_like(p) for p in parts]
    for revived in (stored, [p.clone() for p in parts]):
        for weight, bits in zip(weights, revived, strict=True):
            weight.revived_bits = bits
        found = _revived_on_device(weights, old_bits)  # type: ignore[arg-type]
        assert all(torch.equal(a, b) for a, b in zip(found, parts, strict=True))
    weights[1].revived_bits = None
    found = _revived_on_device(weights, old_bits)  # type: ignore[arg-type]
    assert torch.equal(found[1], torch.zeros(1, dtype=torch.uint8))
    assert torch.equal(found[2], parts[2])
