"""The non-finite check of a step's gradients against its reference, and the flag's contract."""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels.nonfinite import any_nonfinite, any_nonfinite_reference
from resu_compile.kernels.triton.nonfinite import any_nonfinite_triton_
from tests.kernels.segment_cases import DEVICES, DTYPES, GPU_DTYPES, SHAPES

POISONS = [None, float("nan"), float("inf"), float("-inf")]


def _tensors(device: str, dtype: torch.dtype, poison: float | None, where: int) -> list:
    g = torch.Generator().manual_seed(where)
    tensors = [torch.randn(shape, generator=g).to(device, dtype) for shape in SHAPES]
    if poison is not None:
        # The last element of one segment: past the first chunk, at the end of its last tile.
        tensors[where % len(tensors)].view(-1)[-1] = poison
    return tensors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("where", range(len(SHAPES)))
def test_any_nonfinite_matches_reference(device: str, poison: float | None, where: int) -> None:
    for dtype in DTYPES if device == "cpu" else GPU_DTYPES:
        tensors = _tensors(device, dtype, poison, where)
        expected = any_nonfinite_reference(tensors)
        assert expected.item() == (poison is not None)
        if device == "cpu":
            found = torch.zeros(1)
            any_nonfinite_triton_(tensors, dtype, found)
        else:
            found = any_nonfinite(tensors)
        assert found.dtype == torch.float32 and found.shape == (1,)
        assert torch.equal(found, expected), (dtype, poison, where)


def test_any_nonfinite_leaves_a_raised_flag_raised() -> None:
    flag = torch.ones(1)
    any_nonfinite_triton_(_tensors("cpu", torch.float32, None, 0), torch.float32, flag)
    assert flag.item() == 1.0


def test_any_nonfinite_mixed_inputs_take_the_reference_for_the_rest() -> None:
    clean = torch.randn(7, 5)
    bad = torch.randn(5, 7).t()  # not contiguous: the reference's
    bad[0, 0] = float("nan")
    assert any_nonfinite([clean, bad]).item() == 1.0
    assert any_nonfinite([clean, torch.empty(0), bad.abs().nan_to_num()]).item() == 0.0
    with pytest.raises(ValueError, match="tensors"):
        any_nonfinite([])
