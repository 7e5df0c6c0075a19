"""Inline effective-weight linear layer: ``W_eff = where(M, W, Theta)`` built tile by tile.

In the in-place storage of METHOD.md section 1, ``W`` itself holds ``W_eff`` and a linear layer is a
plain cuBLAS matmul. Storage modes that keep ``theta`` apart from ``W`` must still never materialize
``W_eff`` (it would cost a weight-sized temporary and a read + write pass per step, DESIGN.md "The
fast path"), so the three matmuls of a linear layer are Triton kernels that build each ``W_eff``
tile in registers from a tile of ``W``, a tile of ``Theta`` and the packed mask bits
(:mod:`resu_compile.kernels.bits`: element ``i`` of the row-major weight is bit ``i & 7`` of byte
``i >> 3``):

- forward ``Y = X @ W_eff^T (+ bias)``;
- input gradient ``dX = dY @ W_eff`` (the same tiles, read along the other dimension);
- weight gradient ``G = dY^T @ X`` (``G`` is ``W_eff``'s gradient), split in the epilogue into
  ``grad_W = M * G`` and ``grad_Theta = (1 - M) * G`` from the same accumulator tile, so no masking
  pass follows.

``X`` is ``(tokens, in)`` and ``W``, ``Theta`` are ``(out, in)`` as in ``nn.Linear``; leading dims of
``x`` are flattened. Accumulation is fp32; fp32 / fp16 / bf16 inputs (``x``, ``W`` and ``Theta`` of
one dtype, as ``F.linear`` requires). fp32 products use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` says so, as cuBLAS does.

Every ``W_eff`` tile is built in the weight's own row-major orientation (``[out rows, in cols]``).
The forward computes ``Y^T = W_eff @ X^T``, so the built tile is the left operand of the dot, which
on Hopper ``wgmma`` may take from registers where the tile already is; the input gradient computes
``dX = dY @ W_eff`` with the tile as the right operand, untransposed. Both orientations were timed
against the alternatives on an H100 (bf16, 8192x4096x4096) and won. Programs are ordered in groups
(Triton's matmul tutorial) so consecutive programs reuse the same tiles from L2.

Mask bits are read one of two ways. When ``in % 8 == 0`` every weight row starts on a byte, so a
``[rows, BLOCK // 8]`` tile of bytes is loaded (one byte load per 8 weights, "byte tiles") and
expanded to ``[rows, BLOCK]`` by three rounds of ``tl.interleave``, which Triton lowers within each
thread's registers (on the H100 that ran at 1.3x the speed of a 3-D broadcast + ``tl.reshape``,
which goes through shared memory, and at 8-10x that of a per-element byte gather). Otherwise each
element loads its own byte (the gather: correct for any shape, slow; real layers have
``in % 8 == 0``). :data:`BYTE_TILES` turns the first off (for debugging and timing).

Measured on an H100 (torch 2.11, Triton 3.6, bf16, 8192x4096x4096, 50% mask), forward kernels of
this structure: plain Triton (no ``where``) ~620-660 TFLOP/s, a ``where`` of two loaded tiles
without a mask ~520, with the mask bits ~400 (input gradient ~270); cuBLAS ~800. So the inline
kernels trade speed for memory (no ``W_eff`` temporary: +1 weight-sized buffer, the theta gradient,
over dense in a forward + backward, against +2 for materializing through Inductor), and the
in-place storage (plain cuBLAS) stays the fast path (DESIGN.md). ``python -m benchmarks.kernels
--only inline`` measures the trade on a given GPU.

The pure-PyTorch :func:`inline_linear_reference` materializes ``W_eff`` with ``unpack_bits`` and calls
``F.linear``: it is the test oracle and the CPU path. :func:`inline_linear` dispatches: CUDA tensors,
or any tensors under ``TRITON_INTERPRET=1`` (the CPU tests), go to the Triton kernels.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from resu_compile.kernels.bits import packed_numel, unpack_bits

# Read when the kernels below are decorated (as Triton does): the interpreter is a CPU emulator
# that runs every program one op at a time, so it gets one small tile config and no autotuning.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Load mask bits as byte tiles where rows start on a byte (``in % 8 == 0``); False forces the
# per-element gather everywhere (a switch for the benchmark and for debugging a new Triton).
BYTE_TILES = True

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GROUP = 8  # programs per group along the weight dimension (L2 reuse, as in the Triton tutorial)


def _configs(wide_b: bool = True) -> list[triton.Config]:
    """Tile configs: ``BLOCK_A`` x ``BLOCK_B`` accumulator, ``BLOCK_R`` the reduction step.

    On the GPU, Hopper-sized candidates; building ``W_eff`` in registers favours 256-wide tiles
    (256x128x64 with 8 warps was the fastest for both the forward and the input gradient on the
    H100, 1.3-1.6x the 128x128 tiles). ``wide_b=False`` leaves out 128x256: in the forward (the
    built tile as the register operand of a 256-wide ``wgmma``) Triton 3.6 compiled it to wrong
    results on the H100, every other tile being right; ``test_every_config_gpu`` checks each config
    of each kernel. :func:`_prune` drops what does not fit a call. In the interpreter one small
    tile, small enough that the odd test shapes span several programs and reduction steps, and no
    tuning (the interpreter is slow).
    """
    if _INTERPRET:
        return [triton.Config({"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_R": 16}, num_warps=1)]
    shapes = [
        (256, 128, 64, 8, 3),
        *([(128, 256, 64, 8, 3)] if wide_b else []),
        (128, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        # fp32 operands: smaller tiles (4-byte elements; ``ieee`` products run on FMA units).
        (64, 64, 32, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_A": a, "BLOCK_B": b, "BLOCK_R": r}, num_warps=w, num_stages=s)
        for a, b, r, w, s in shapes
    ]


def _prune(dim_a: str, dim_b: str, operand: str):
    """``early_config_prune`` for a kernel whose accumulator spans ``dim_a`` x ``dim_b``.

    fp32 operands keep the 32-wide-reduction config only (the 16-bit tiles overflow shared memory,
    and full-precision fp32 products are FMA work where large tiles only lengthen compiles); 16-bit
    operands drop it, and drop tiles wider than the problem (next power of two) so small layers tune
    among tiles that fit, keeping at least the smallest.
    """

    def prune(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
        fp32 = nargs[operand].dtype == torch.float32
        picked = [c for c in configs if (c.kwargs["BLOCK_R"] == 32) == fp32]
        size_a = triton.next_power_of_2(nargs[dim_a])
        size_b = triton.next_power_of_2(nargs[dim_b])
        fit = [c for c in picked if c.kwargs["BLOCK_A"] <= size_a and c.kwargs["BLOCK_B"] <= size_b]
        smallest = min(picked, key=lambda c: c.kwargs["BLOCK_A"] * c.kwargs["BLOCK_B"])
        return fit or [smallest]

    return prune


@triton.jit
def _grouped_pids(pid, n_a, n_b, GROUP: tl.constexpr):
    """Program ``pid`` -> tile ``(pid_a, pid_b)``, walking ``GROUP`` rows of tiles column by column
    (the tutorial's L2-friendly order) instead of row-major."""
    in_group = GROUP * n_b
    group_id = pid // in_group
    first_a = group_id * GROUP
    group_size = min(n_a - first_a, GROUP)
    pid_a = first_a + ((pid % in_group) % group_size)
    pid_b = (pid % in_group) // group_size
    return pid_a, pid_b


@triton.jit
def _mask_tile(
    bits_ptr,
    offs_n,
    k0,
    N,
    K,
    BYTE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Mask bits of weight rows ``offs_n`` x columns ``k0 .. k0 + BLOCK_K`` as a boolean
    ``[BLOCK_N, BLOCK_K]`` tile; out-of-bounds elements are False.

    ``BYTE_TILE`` needs ``K % 8 == 0`` and ``k0 % 8 == 0``: then the ``BLOCK_K`` columns of a row
    are exactly bytes ``(n * K + k0) / 8 + j``, ``j < BLOCK_K / 8``, column ``8 j + b`` being bit
    ``b`` of byte ``j``. ``interleave(x, y)`` puts ``x[i]`` at ``2 i`` and ``y[i]`` at ``2 i + 1``,
    so three rounds split the column's bit index ``b = 4 b2 + 2 b1 + b0`` from its lowest bit up:
    the last round by ``b0``, the one before by ``b1``, the first pairs bit planes ``b`` and
    ``b + 4``.
    """
    if BYTE_TILE:
        kb = K // 8
        offs_kb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        ok = (offs_n[:, None] < N) & (offs_kb[None, :] < kb)
        byte = tl.load(bits_ptr + offs_n[:, None] * kb + offs_kb[None, :], mask=ok, other=0)
        byte = byte.to(tl.int32)
        e0 = tl.interleave(
            tl.interleave(byte & 1, (byte >> 4) & 1),
            tl.interleave((byte >> 2) & 1, (byte >> 6) & 1),
        )
        e1 = tl.interleave(
            tl.interleave((byte >> 1) & 1, (byte >> 5) & 1),
            tl.interleave((byte >> 3) & 1, (byte >> 7) & 1),
        )
        bits = tl.interleave(e0, e1)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        flat = offs_n[:, None] * K + offs_k[None, :]
        ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        byte = tl.load(bits_ptr + (flat >> 3), mask=ok, other=0)
        bits = (byte.to(tl.int32) >> (flat & 7)) & 1
    return bits != 0


@triton.jit
def _w_eff_tile(
    w_ptr,
    theta_ptr,
    bits_ptr,
    offs_n,
    k0,
    N,
    K,
    stride_wn,
    stride_wk,
    stride_tn,
    stride_tk,
    BYTE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``where(M, W, Theta)`` on rows ``offs_n`` x columns ``k0 ..`` (``[BLOCK_N, BLOCK_K]``), in
    registers; 0 out of bounds."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(
        w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=ok, other=0.0
    )
    t = tl.load(
        theta_ptr + offs_n[:, None] * stride_tn + offs_k[None, :] * stride_tk, mask=ok, other=0.0
    )
    bits = _mask_tile(bits_ptr, offs_n, k0, N, K, BYTE_TILE, BLOCK_N, BLOCK_K)
    return tl.where(bits, w, t)


@triton.autotune(
    configs=_configs(wide_b=False),
    key=["M", "N", "K", "BYTE_TILE", "HAS_BIAS", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune("N", "M", "x_ptr")},
)
@triton.jit
def _forward_kernel(
    x_ptr,
    w_ptr,
    theta_ptr,
    bits_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_tn,
    stride_tk,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    BYTE_TILE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``Y^T[n, m] = sum_k W_eff[n, k] X[m, k]`` (+ ``bias[n]``): A = out features, B = tokens,
    R = in features."""
    pid_n, pid_m = _grouped_pids(tl.program_id(0), tl.cdiv(N, BLOCK_A), tl.cdiv(M, BLOCK_B), GROUP)
    offs_n = pid_n * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_m = (pid_m * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_R):
        w_eff = _w_eff_tile(
            w_ptr,
            theta_ptr,
            bits_ptr,
            offs_n,
            k0,
            N,
            K,
            stride_wn,
            stride_wk,
            stride_tn,
            stride_tk,
            BYTE_TILE,
            BLOCK_A,
            BLOCK_R,
        )
        offs_k = k0 + tl.arange(0, BLOCK_R)
        xt = tl.load(
            x_ptr + offs_k[:, None] * stride_xk + offs_m[None, :] * stride_xm,
            mask=(offs_k[:, None] < K) & (offs_m[None, :] < M),
            other=0.0,
        )
        acc = tl.dot(w_eff, xt, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[:, None]
    tl.store(
        y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(offs_n[:, None] < N) & (offs_m[None, :] < M),
    )


@triton.autotune(
    configs=_configs(),
    key=["M", "N", "K", "BYTE_TILE", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune("M", "K", "dy_ptr")},
)
@triton.jit
def _grad_input_kernel(
    dy_ptr,
    w_ptr,
    theta_ptr,
    bits_ptr,
    dx_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_tn,
    stride_tk,
    stride_dxm,
    stride_dxk,
    BYTE_TILE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``dX[m, k] = sum_n dY[m, n] W_eff[n, k]``: A = tokens, B = in features, R = out features."""
    pid_m, pid_k = _grouped_pids(tl.program_id(0), tl.cdiv(M, BLOCK_A), tl.cdiv(K, BLOCK_B), GROUP)
    offs_m = (pid_m * BLOCK_A + tl.arange(0, BLOCK_A)).to(tl.int64)
    k0 = pid_k * BLOCK_B
    offs_k = k0 + tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_R):
        offs_n = n0 + tl.arange(0, BLOCK_R)
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
            other=0.0,
        )
        w_eff = _w_eff_tile(
            w_ptr,
            theta_ptr,
            bits_ptr,
            offs_n,
            k0,
            N,
            K,
            stride_wn,
            stride_wk,
            stride_tn,
            stride_tk,
            BYTE_TILE,
            BLOCK_R,
            BLOCK_B,
        )
        acc = tl.dot(dy, w_eff, acc, input_precision=INPUT_PRECISION)
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
        acc.to(dx_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
    )


@triton.autotune(
    configs=_configs(),
    key=["M", "N", "K", "BYTE_TILE", "WRITE_W", "WRITE_THETA", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune("N", "K", "x_ptr")},
)
@triton.jit
def _grad_weight_kernel(
    dy_ptr,
    x_ptr,
    bits_ptr,
    gw_ptr,
    gt_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_xk,
    WRITE_W: tl.constexpr,
    WRITE_THETA: tl.constexpr,
    BYTE_TILE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``G[n, k] = sum_m dY[m, n] X[m, k]``, stored as ``M * G`` and ``(1 - M) * G`` (both
    contiguous ``(N, K)``): A = out features, B = in features, R = tokens."""
    pid_n, pid_k = _grouped_pids(tl.program_id(0), tl.cdiv(N, BLOCK_A), tl.cdiv(K, BLOCK_B), GROUP)
    offs_n = pid_n * BLOCK_A + tl.arange(0, BLOCK_A)
    k0 = pid_k * BLOCK_B
    offs_k = k0 + tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_R):
        offs_m = (m0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        dyt = tl.load(
            dy_ptr + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
            mask=(offs_n[:, None] < N) & (offs_m[None, :] < M),
            other=0.0,
        )
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )
        acc = tl.dot(dyt, x, acc, input_precision=INPUT_PRECISION)
    bits = _mask_tile(bits_ptr, offs_n, k0, N, K, BYTE_TILE, BLOCK_A, BLOCK_B)
    ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    offs = offs_n[:, None] * K + offs_k[None, :]
    if WRITE_W:
        gw = tl.where(bits, acc, 0.0)
        tl.store(gw_ptr + offs, gw.to(gw_ptr.dtype.element_ty), mask=ok)
    if WRITE_THETA:
        gt = tl.where(bits, 0.0, acc)
        tl.store(gt_ptr + offs, gt.to(gt_ptr.dtype.element_ty), mask=ok)


def _input_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 products only where torch lets cuBLAS use it (matching ``F.linear``)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _byte_tile(in_features: int, byte_tiles: bool | None) -> bool:
    if byte_tiles is None:
        byte_tiles = BYTE_TILES
    return bool(byte_tiles) and in_features % 8 == 0


def _check(weight: torch.Tensor, mask_bits: torch.Tensor, theta: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"inline_linear: weight must be 2-D (out, in), got {tuple(weight.shape)}")
    if theta.shape != weight.shape:
        raise ValueError(
            f"inline_linear: theta has shape {tuple(theta.shape)}, weight {tuple(weight.shape)}"
        )
    if theta.dtype != weight.dtype:
        raise TypeError(f"inline_linear: theta is {theta.dtype}, weight {weight.dtype}")
    if mask_bits.dtype != torch.uint8 or mask_bits.numel() != packed_numel(weight.numel()):
        raise ValueError(
            f"inline_linear: mask_bits must be {packed_numel(weight.numel())} uint8 values "
            f"(pack_bits of the mask), got {mask_bits.numel()} of {mask_bits.dtype}"
        )


def _grid(a: int, b: int):
    return lambda meta: (triton.cdiv(a, meta["BLOCK_A"]) * triton.cdiv(b, meta["BLOCK_B"]),)


def inline_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask_bits: torch.Tensor,
    theta: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    byte_tiles: bool | None = None,
) -> torch.Tensor:
    """Triton ``x @ where(M, W, Theta)^T (+ bias)`` for a 2-D ``x`` (tokens, in); no autograd.

    ``byte_tiles`` overrides :data:`BYTE_TILES` (it only applies where ``in % 8 == 0``).
    """
    _check(weight, mask_bits, theta)
    (m, k), n = x.shape, weight.shape[0]
    if k != weight.shape[1]:
        raise ValueError(f"inline_linear: x has {k} features, weight {weight.shape[1]}")
    if x.dtype not in _DTYPES or x.dtype != weight.dtype:
        raise TypeError(f"inline_linear: x is {x.dtype}, weight {weight.dtype} (one of {_DTYPES})")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.copy_(bias.expand(m, n)) if bias is not None else y.zero_()
    _forward_kernel[_grid(n, m)](
        x,
        weight,
        theta,
        mask_bits,
        bias if bias is not None else y,
        y,
        m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        theta.stride(0),
        theta.stride(1),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
        BYTE_TILE=_byte_tile(k, byte_tiles),
        INPUT_PRECISION=_input_precision(x.dtype),
        GROUP=_GROUP,
    )
    return y


def inline_linear_grad_input(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    mask_bits: torch.Tensor,
    theta: torch.Tensor,
    *,
    byte_tiles: bool | None = None,
) -> torch.Tensor:
    """Triton ``dX = dY @ where(M, W, Theta)`` for a 2-D ``grad_out`` (tokens, out)."""
    _check(weight, mask_bits, theta)
    (m, n), k = grad_out.shape, weight.shape[1]
    if n != weight.shape[0] or grad_out.dtype != weight.dtype:
        raise ValueError(
            f"inline_linear: grad_out {tuple(grad_out.shape)} {grad_out.dtype} does not match "
            f"weight {tuple(weight.shape)} {weight.dtype}"
        )
    dx = torch.empty((m, k), dtype=grad_out.dtype, device=grad_out.device)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    _grad_input_kernel[_grid(m, k)](
        grad_out,
        weight,
        theta,
        mask_bits,
        dx,
        m,
        n,
        k,
        grad_out.stride(0),
        grad_out.stride(1),
        weight.stride(0),
        weight.stride(1),
        theta.stride(0),
        theta.stride(1),
        dx.stride(0),
        dx.stride(1),
        BYTE_TILE=_byte_tile(k, byte_tiles),
        INPUT_PRECISION=_input_precision(grad_out.dtype),
        GROUP=_GROUP,
    )
    return dx


def inline_linear_grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mask_bits: torch.Tensor,
    *,
    weight_dtype: torch.dtype | None = None,
    write_weight: bool = True,
    write_theta: bool = True,
    byte_tiles: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Triton ``(M * G, (1 - M) * G)`` with ``G = dY^T @ X``, both ``(out, in)`` and contiguous.

    One accumulator tile feeds both outputs, so ``G`` is never stored; either output can be
    skipped (``None``) when its tensor needs no gradient.
    """
    (m, n), k = grad_out.shape, x.shape[1]
    if x.shape[0] != m or x.dtype != grad_out.dtype:
        raise ValueError(
            f"inline_linear: grad_out {tuple(grad_out.shape)} {grad_out.dtype} does not match "
            f"x {tuple(x.shape)} {x.dtype}"
        )
    if mask_bits.dtype != torch.uint8 or mask_bits.numel() != packed_numel(n * k):
        raise ValueError(f"inline_linear: mask_bits must be {packed_numel(n * k)} uint8 values")
    dtype = weight_dtype or grad_out.dtype
    alloc = torch.zeros if m == 0 else torch.empty
    gw = alloc((n, k), dtype=dtype, device=x.device) if write_weight else None
    gt = alloc((n, k), dtype=dtype, device=x.device) if write_theta else None
    if m == 0 or n == 0 or k == 0 or not (write_weight or write_theta):
        return gw, gt
    dummy = gw if gw is not None else gt
    _grad_weight_kernel[_grid(n, k)](
        grad_out,
        x,
        mask_bits,
        gw if gw is not None else dummy,
        gt if gt is not None else dummy,
        m,
        n,
        k,
        grad_out.stride(0),
        grad_out.stride(1),
        x.stride(0),
        x.stride(1),
        WRITE_W=write_weight,
        WRITE_THETA=write_theta,
        BYTE_TILE=_byte_tile(k, byte_tiles),
        INPUT_PRECISION=_input_precision(x.dtype),
        GROUP=_GROUP,
    )
    return gw, gt


class InlineLinear(torch.autograd.Function):
    """``F.linear(x, where(M, W, Theta), bias)`` on the Triton kernels, ``W_eff`` never in memory.

    ``apply(x, weight, mask_bits, theta, bias)``: gradients flow to ``x``, ``weight`` (``M * G``),
    ``theta`` (``(1 - M) * G``) and ``bias`` (``dY`` summed over tokens); ``mask_bits`` gets none.
    Only the matmuls whose outputs are needed run.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        mask_bits: torch.Tensor,
        theta: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = inline_linear_forward(x2, weight, mask_bits, theta, bias)
        ctx.save_for_backward(x2, weight, mask_bits, theta)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_shape = x.shape
        return y.reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, weight, mask_bits, theta = ctx.saved_tensors
        need_x, need_w, _, need_t, need_b = ctx.needs_input_grad
        dy = grad_out.reshape(-1, weight.shape[0])
        dx = gw = gt = db = None
        if need_x:
            dx = inline_linear_grad_input(dy, weight, mask_bits, theta).reshape(ctx.x_shape)
        if need_w or need_t:
            gw, gt = inline_linear_grad_weight(
                dy,
                x2,
                mask_bits,
                weight_dtype=weight.dtype,
                write_weight=need_w,
                write_theta=need_t,
            )
        if need_b and ctx.has_bias:
            db = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, gw, None, gt, db


def inline_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask_bits: torch.Tensor,
    theta: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, where(M, W, Theta), bias)`` with ``W_eff`` materialized: the oracle, CPU path.

    Autograd through ``torch.where`` gives exactly ``M * G`` to ``weight`` and ``(1 - M) * G`` to
    ``theta``.
    """
    _check(weight, mask_bits, theta)
    mask = unpack_bits(mask_bits, weight.shape)
    return F.linear(x, torch.where(mask, weight, theta), bias)


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def inline_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask_bits: torch.Tensor,
    theta: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ where(M, W, Theta)^T + bias`` without materializing ``W_eff`` where Triton runs.

    CUDA tensors (or any tensors under ``TRITON_INTERPRET=1``) take :class:`InlineLinear`;
    otherwise :func:`inline_linear_reference`, whose temporary ``W_eff`` is harmless on the CPU.
    """
    if _use_triton(x):
        return InlineLinear.apply(x, weight, mask_bits, theta, bias)
    return inline_linear_reference(x, weight, mask_bits, theta, bias)
