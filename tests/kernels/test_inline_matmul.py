"""The inline effective-weight matmul against the pure-PyTorch reference.

On the CPU the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set by conftest) on
small odd shapes that end on partial tiles and partial mask bytes; GPU-marked tests repeat them at
layer size in every dtype. The oracle is :func:`inline_linear_reference` in float64 on the same
(rounded) inputs, so the only error allowed is the kernel's own: fp32 accumulation and the rounding
of the output. The split of the weight gradient must be exact: ``grad_W`` is 0 wherever the mask
is 0 and ``grad_Theta`` is 0 wherever it is 1, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resu_compile.kernels import inline_matmul
from resu_compile.kernels.bits import pack_bits
from resu_compile.kernels.inline_matmul import (
    InlineLinear,
    inline_linear,
    inline_linear_forward,
    inline_linear_grad_input,
    inline_linear_grad_weight,
    inline_linear_reference,
)

# (tokens, in, out). With the interpreter's 16-wide tiles: 5x37x23 ends on partial tiles in every
# dimension and on partial mask bytes (in % 8 != 0, the per-element bit gather); 9x40x33 has
# in % 8 == 0 (byte tiles) with partial tiles; 3x2x130 is a tall, thin weight.
SHAPES = [(5, 37, 23), (1, 1, 1), (3, 2, 130), (9, 40, 33)]
MASKS = ["all_active", "all_pruned", "random"]
CPU_DTYPES = [torch.float32, torch.float16]  # bf16 is wrong in the interpreter (DESIGN.md)
# Relative to the largest magnitude of the reference output: fp32 accumulation error, and for the
# 16-bit types the rounding of the output (half an ulp, 2^-11 / 2^-8 relative).
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _mask(kind: str, out_f: int, in_f: int, seed: int = 3) -> torch.Tensor:
    if kind == "all_active":
        return torch.ones(out_f, in_f, dtype=torch.bool)
    if kind == "all_pruned":
        return torch.zeros(out_f, in_f, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(out_f, in_f, generator=gen) < 0.5


def _inputs(shape, dtype, device, mask_kind, bias=True, lead=()):
    """x, weight, packed mask, theta, bias and the upstream gradient, seeded."""
    tokens, in_f, out_f = shape
    gen = torch.Generator().manual_seed(sum(shape))

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    mask = _mask(mask_kind, out_f, in_f)
    x = rand(*lead, tokens, in_f)
    weight, theta = rand(out_f, in_f), rand(out_f, in_f)
    b = rand(out_f) if bias else None
    dy = rand(*lead, tokens, out_f)
    return x, weight, pack_bits(mask).to(device), theta, b, dy, mask.to(device)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} > {TOL[dtype]:.1g} x {scale:.3g}"


def _check(shape, dtype, mask_kind, device, bias=True, lead=()) -> None:
    """Forward and every gradient of :class:`InlineLinear` against the float64 reference."""
    x, w, bits, theta, b, dy, mask = _inputs(shape, dtype, device, mask_kind, bias, lead)
    leaves = [t.clone().requires_grad_() for t in (x, w, theta)] + (
        [b.clone().requires_grad_()] if bias else []
    )
    y = InlineLinear.apply(leaves[0], leaves[1], bits, leaves[2], leaves[3] if bias else None)
    got = torch.autograd.grad(y, leaves, dy)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = inline_linear_reference(
        ref_leaves[0], ref_leaves[1], bits, ref_leaves[2], ref_leaves[3] if bias else None
    )
    want = torch.autograd.grad(y_ref, ref_leaves, dy.double())

    _close(y, y_ref.detach(), dtype)
    for g, r in zip(got, want, strict=True):
        _close(g, r, dtype)
    grad_w, grad_theta = got[1], got[2]
    assert torch.equal(grad_w[~mask], torch.zeros_like(grad_w[~mask]))
    assert torch.equal(grad_theta[mask], torch.zeros_like(grad_theta[mask]))


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, mask_kind) -> None:
    _check(shape, dtype, mask_kind, "cpu")


def test_square_64() -> None:
    """64x64x64: whole tiles only, several programs and reduction steps per kernel."""
    _check((64, 64, 64), torch.float32, "random", "cpu")


def test_leading_dims_and_no_bias() -> None:
    _check((5, 37, 23), torch.float32, "random", "cpu", bias=False, lead=(2,))


@pytest.mark.parametrize("shape", [(9, 40, 33), (5, 16, 23)], ids=str)
def test_bit_gather_equals_byte_tiles(shape) -> None:
    """With in % 8 == 0 both ways of reading the mask run; they must agree bit for bit."""
    x, w, bits, theta, _, dy, _ = _inputs(shape, torch.float32, "cpu", "random")
    for fn, args in (
        (inline_linear_forward, (x, w, bits, theta)),
        (inline_linear_grad_input, (dy.reshape(-1, w.shape[0]), w, bits, theta)),
    ):
        assert torch.equal(fn(*args, byte_tiles=True), fn(*args, byte_tiles=False))
    tiles = inline_linear_grad_weight(dy, x, bits, byte_tiles=True)
    gather = inline_linear_grad_weight(dy, x, bits, byte_tiles=False)
    for a, b in zip(tiles, gather, strict=True):
        assert torch.equal(a, b)


def test_all_active_forward_is_f_linear() -> None:
    """All-active mask: the Triton forward is ``F.linear`` on ``W`` within fp32 rounding (theta,
    however large, never leaks in)."""
    x, w, _, _, b, _, _ = _inputs((9, 40, 33), torch.float32, "cpu", "all_active")
    bits = pack_bits(torch.ones(w.shape, dtype=torch.bool))
    theta = torch.full_like(w, 1e6)
    torch.testing.assert_close(
        inline_linear_forward(x, w, bits, theta, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5
    )


def test_only_needed_gradients() -> None:
    """RESU-phase use: frozen W and x, only theta trains; the other outputs stay None."""
    x, w, bits, theta, _, dy, mask = _inputs((5, 37, 23), torch.float32, "cpu", "random")
    theta = theta.requires_grad_()
    y = InlineLinear.apply(x, w, bits, theta, None)
    (grad_theta,) = torch.autograd.grad(y, [theta], dy)
    ref = theta.detach().double().requires_grad_()
    y_ref = inline_linear_reference(x.double(), w.double(), bits, ref)
    (want,) = torch.autograd.grad(y_ref, [ref], dy.double())
    _close(grad_theta, want, torch.float32)
    gw, gt = inline_linear_grad_weight(dy, x, bits, write_theta=False)
    assert gt is None and torch.equal(gw[~mask], torch.zeros_like(gw[~mask]))


def test_strided_weight_and_theta() -> None:
    """W and theta may be views (transposed storage); the mask indexes W's logical row-major order."""
    x, w, bits, theta, b, _, _ = _inputs((5, 37, 23), torch.float32, "cpu", "random")
    w_t = w.t().contiguous().t()
    theta_t = theta.t().contiguous().t()
    assert not w_t.is_contiguous()
    torch.testing.assert_close(
        inline_linear_forward(x, w_t, bits, theta_t, b),
        inline_linear_reference(x, w, bits, theta, b),
        rtol=1e-5,
        atol=1e-5,
    )


def test_empty_tokens() -> None:
    x, w, bits, theta, b, _, _ = _inputs((5, 37, 23), torch.float32, "cpu", "random")
    x = x[:0].requires_grad_()
    w = w.requires_grad_()
    y = InlineLinear.apply(x, w, bits, theta, b)
    assert y.shape == (0, 23)
    (gw,) = torch.autograd.grad(y.sum(), [w])
    assert torch.equal(gw, torch.zeros_like(gw))


def test_dispatch(monkeypatch) -> None:
    """Interpreter set: the Triton path (autograd node InlineLinear); unset on CPU: the reference."""
    x, w, bits, theta, b, _, _ = _inputs((5, 37, 23), torch.float32, "cpu", "random")
    w = w.requires_grad_()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert type(inline_linear(x, w, bits, theta, b).grad_fn).__name__ == "InlineLinearBackward"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    y = inline_linear(x, w, bits, theta, b)
    assert type(y.grad_fn).__name__ != "InlineLinearBackward"
    torch.testing.assert_close(y, inline_linear_reference(x, w, bits, theta, b))


def test_reference_gradcheck() -> None:
    """float64 gradcheck of the reference (the oracle's own gradients), random mask, with bias."""
    x, w, bits, theta, b, _, _ = _inputs((3, 10, 7), torch.float64, "cpu", "random", lead=(2,))
    args = [t.requires_grad_() for t in (x, w, theta, b)]
    assert torch.autograd.gradcheck(
        lambda x, w, t, b: inline_linear_reference(x, w, bits, t, b), args
    )


def test_rejects_bad_arguments() -> None:
    x, w, bits, theta, _, _, _ = _inputs((5, 37, 23), torch.float32, "cpu", "random")
    with pytest.raises(ValueError, match="uint8"):
        inline_linear_forward(x, w, bits[:-1], theta)
    with pytest.raises(ValueError, match="theta has shape"):
        inline_linear_forward(x, w, bits, theta[:, :-1])
    with pytest.raises(TypeError, match="theta is"):
        inline_linear_forward(x, w, bits, theta.half())
    with pytest.raises(TypeError, match="x is"):
        inline_linear_forward(x.half(), w, bits, theta)
    with pytest.raises(ValueError, match="features"):
        inline_linear_forward(x[:, :-1], w, bits, theta)


GPU_SHAPES = [(512, 1024, 768), (5, 37, 23), (300, 200, 136)]


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_matches_reference_gpu(shape, dtype, mask_kind) -> None:
    _check(shape, dtype, mask_kind, "cuda", lead=(2,) if shape[0] == 5 else ())


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_bit_gather_equals_byte_tiles_gpu(dtype, monkeypatch) -> None:
    """Both mask reads on the GPU (in % 8 == 0). The autotuner tunes them apart and may pick other
    tiles (another fp32 summation order), so they agree to the dtype's rounding; the split of the
    weight gradient is exact in both."""
    monkeypatch.setattr(inline_matmul, "BYTE_TILES", True)
    x, w, bits, theta, b, dy, mask = _inputs((100, 72, 136), dtype, "cuda", "random")
    tiles = (
        inline_linear_forward(x, w, bits, theta, b),
        inline_linear_grad_input(dy, w, bits, theta),
        *inline_linear_grad_weight(dy, x, bits),
    )
    monkeypatch.setattr(inline_matmul, "BYTE_TILES", False)
    gather = (
        inline_linear_forward(x, w, bits, theta, b),
        inline_linear_grad_input(dy, w, bits, theta),
        *inline_linear_grad_weight(dy, x, bits),
    )
    for a, g in zip(tiles, gather, strict=True):
        _close(a, g.double(), dtype)
    for grad_w, grad_theta in (tiles[2:], gather[2:]):
        assert not grad_w[~mask].any() and not grad_theta[mask].any()


@pytest.mark.gpu
@CUDA
def test_all_active_forward_is_f_linear_gpu() -> None:
    x, w, _, _, b, _, _ = _inputs((512, 1024, 768), torch.float32, "cuda", "all_active")
    bits = pack_bits(torch.ones(w.shape, dtype=torch.bool, device="cuda"))
    torch.testing.assert_close(
        inline_linear_forward(x, w, bits, torch.full_like(w, 1e6), b),
        F.linear(x, w, b),
        rtol=1e-5,
        atol=1e-4,
    )


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("kernel", ["forward", "grad_input", "grad_weight"])
def test_every_config_gpu(kernel, monkeypatch) -> None:
    """Each 16-bit tile config of each kernel, not only the one the autotuner picks: a config that
    compiles to wrong results (one did, see ``_configs``) must not hide behind a faster one."""
    x, w, bits, theta, _, dy, mask = _inputs((512, 1024, 768), torch.bfloat16, "cuda", "random")
    w_eff = torch.where(mask, w, theta).double()
    autotuner, run, want = {
        "forward": (
            inline_matmul._forward_kernel,
            lambda: [inline_linear_forward(x, w, bits, theta)],
            [x.double() @ w_eff.T],
        ),
        "grad_input": (
            inline_matmul._grad_input_kernel,
            lambda: [inline_linear_grad_input(dy, w, bits, theta)],
            [dy.double() @ w_eff],
        ),
        "grad_weight": (
            inline_matmul._grad_weight_kernel,
            lambda: list(inline_linear_grad_weight(dy, x, bits)),
            [
                (dy.double().T @ x.double()) * mask,
                (dy.double().T @ x.double()) * ~mask,
            ],
        ),
    }[kernel]
    configs = [c for c in autotuner.configs if c.kwargs["BLOCK_R"] != 32]
    assert len(configs) >= 4
    for config in configs:
        monkeypatch.setattr(autotuner, "configs", [config])  # one config: no tuning, no cache
        for got, ref in zip(run(), want, strict=True):
            _close(got, ref, torch.bfloat16)
