"""Sort-free top-k threshold: count within 1% of k (or the exact k-th largest), on hard inputs."""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels.reference import topk_threshold
from resu_compile.kernels.select import MIN_NUMEL, count_at_least, topk_threshold_approx

N = 30_000
_GEN = torch.Generator().manual_seed(11)
VALUES = {
    "abs_normal": torch.randn(N, generator=_GEN).abs(),
    "normal": torch.randn(N, generator=_GEN),
    "heavy_ties": torch.randint(0, 5, (N,), generator=_GEN).float(),
    "constant": torch.full((N,), 0.25),
    "signed_zeros": torch.cat([torch.zeros(N // 3), -torch.zeros(N // 3), torch.randn(N // 3)]),
    "infinities": torch.cat(
        [torch.full((N // 4,), float("-inf")), torch.randn(N // 2), torch.full((50,), float("inf"))]
    ),
    "tiny_and_huge": torch.cat([torch.rand(N // 2) * 1e-38, torch.rand(N // 2) * 1e30]),
}


def _check(values: torch.Tensor, k: int) -> None:
    t = topk_threshold_approx(values, k)
    count = count_at_least(values, t)
    assert abs(count - k) <= 0.01 * k or t == topk_threshold(values, k), (k, t, count)
    # The threshold is a value of the tensor's dtype, so comparing against it is exact.
    assert torch.tensor(t, dtype=values.dtype).item() == t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(VALUES))
def test_count_within_one_percent(name: str, dtype: torch.dtype) -> None:
    """bf16 is safe in the interpreter here: the kernel only moves integer bit patterns."""
    values = VALUES[name].to(dtype)
    n = values.numel()
    for k in (1, 3, 250, n // 5, n // 2, n - 1, n):
        _check(values, k)


def test_small_k_is_exact() -> None:
    """Under k = 100 a 1% tolerance is below one element: without ties the count must be k."""
    values = VALUES["normal"]
    for k in (1, 2, 50, 99):
        assert count_at_least(values, topk_threshold_approx(values, k)) == k


def test_negative_zero_counts_as_zero() -> None:
    """``-0.0 >= 0.0`` holds, so -0.0 must share +0.0's key, else a threshold of 0.0 over-counts."""
    denormals = torch.rand(N // 2, generator=torch.Generator().manual_seed(13)) * 1e-40
    values = torch.cat([-torch.zeros(N // 2), denormals])
    _check(values, N // 2 - 10)


def test_multidimensional_and_non_contiguous() -> None:
    values = VALUES["abs_normal"].reshape(100, 300).t()
    _check(values, 6000)


def test_tiny_tensor_falls_back_to_exact() -> None:
    values = torch.randn(MIN_NUMEL - 1, generator=torch.Generator().manual_seed(12))
    assert topk_threshold_approx(values, 100) == topk_threshold(values, 100)


def test_invalid_k() -> None:
    with pytest.raises(ValueError):
        topk_threshold_approx(VALUES["normal"], 0)
    with pytest.raises(ValueError):
        topk_threshold_approx(VALUES["normal"], N + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(VALUES))
def test_count_within_one_percent_gpu(name: str, dtype: torch.dtype) -> None:
    values = VALUES[name].to(device="cuda", dtype=dtype).repeat(40)  # 1.2M values
    n = values.numel()
    for k in (1, 3, 250, n // 5, n // 2, n - 1, n):
        _check(values, k)
