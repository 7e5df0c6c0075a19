"""The calibrate variant's column sums of squares: the Triton kernel (interpreted on CPU) and the
op against their reference, on contiguous, strided and channels-last inputs."""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels.column_norms import (
    column_sq_sums,
    column_sq_sums_reference,
    row_dims,
)
from resu_compile.kernels.triton.column_norms import column_sq_sums_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(DEVICE)

    return {
        "2-D, rows split among programs": randn(300, 40),
        "3-D contiguous": randn(3, 70, 33),
        "transposed (columns strided)": randn(50, 90).t(),
        "channels last of NCHW": randn(2, 6, 5, 7).movedim(1, -1),
        "a batch slice": randn(4, 30, 20)[:, 3:25],
        "bf16": randn(129, 136).to(torch.bfloat16),
    }


@pytest.mark.parametrize("case", list(_inputs()))
def test_kernel_matches_the_reference(case: str) -> None:
    x = _inputs()[case]
    rows = row_dims(x)
    assert rows is not None
    torch.testing.assert_close(column_sq_sums_triton(x, *rows), column_sq_sums_reference(x))


def test_row_dims_merge_what_addresses_every_row_and_refuse_the_rest() -> None:
    x = torch.empty(2, 6, 5, 7).movedim(1, -1)  # (N, H, W, C), strides (210, 7, 1, 35)
    assert row_dims(x) == ((2, 210), (35, 1))
    assert row_dims(torch.empty(3, 4, 5)) == ((1, 0), (12, 5))
    assert row_dims(torch.empty(5)) == ((1, 0), (1, 0))
    assert row_dims(torch.empty(4, 6, 8, 3).permute(1, 0, 2, 3)) is None


def test_op_matches_the_reference_on_every_layout() -> None:
    for x in [*_inputs().values(), torch.empty(4, 6, 8, 3).normal_().permute(1, 0, 2, 3)]:
        torch.testing.assert_close(column_sq_sums(x), column_sq_sums_reference(x))


def test_one_dimensional_input_gives_its_own_squares() -> None:
    x = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(column_sq_sums(x), x.square())
