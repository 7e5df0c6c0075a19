"""Linear layers on the 2:4 sparse tensor cores (cuSPARSELt) while their mask is 2:4.

A 2:4 weight keeps at most 2 of every 4 consecutive inputs of a row, so ``x @ W^T`` can run on
the sparse tensor cores. When the mask is also *transposable* (every 4x4 block 2:4 in its rows and
its columns, :func:`~resu_compile.method.pruning.transposable_nm_mask`), ``W^T`` is 2:4 too and the
input gradient ``g @ W`` runs there as well; otherwise that product stays dense. The weight
gradient ``g^T @ x`` is a dense product in both cases (no sparse kernel writes only the kept
entries of an output).

Each product compresses its sparse operand inside the op (:func:`semi_sparse_mm_t`): the weight
changes every optimizer step, and a compressed copy kept across steps would be one more state to
keep fresh. The op is opaque to Inductor, so the compiled graph needs no size for cuSPARSELt's
compressed layout. cuSPARSELt sets up each call on the host (0.4-0.7 ms on an H200); inside a CUDA
graph that cost is paid once at capture, which is why the backend compiles these variants with
Inductor's CUDA graphs.
"""

from __future__ import annotations

import torch

#: The dtypes cuSPARSELt runs 2:4 in (fp32 would be 1:2 as TF32).
SEMI_SPARSE_DTYPES = (torch.float16, torch.bfloat16)
#: cuSPARSELt's shape rule for 16-bit operands: the sparse operand's rows and columns are
#: multiples of 16, the dense operand's of 8 (the token count is padded up to it here).
SPARSE_MULTIPLE = 16
DENSE_MULTIPLE = 8


def semi_sparse_reason(
    out_features: int, in_features: int, dtype: torch.dtype, device: str
) -> str | None:
    """Why a linear product of this shape, compute dtype and device cannot take the sparse
    tensor cores, or None when it can."""
    if device != "cuda":
        return f"on {device}, not CUDA"
    if dtype not in SEMI_SPARSE_DTYPES:
        return f"computes in {dtype}; 2:4 kernels take float16 or bfloat16 (use autocast)"
    if out_features % SPARSE_MULTIPLE or in_features % SPARSE_MULTIPLE:
        return (
            f"shape ({out_features}, {in_features}) is not a multiple of {SPARSE_MULTIPLE} in "
            "both dims"
        )
    return None


@torch.library.custom_op("resu::semi_sparse_mm_t", mutates_args=())
def semi_sparse_mm_t(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``(sparse @ dense)^T``, contiguous, where every row of ``sparse`` keeps at most 2 of each
    4 consecutive entries (rows already pruned: the op does not check the pattern).

    On CUDA the product runs on cuSPARSELt; elsewhere :func:`semi_sparse_mm_t_reference` runs.
    """
    if not sparse.is_cuda:
        return semi_sparse_mm_t_reference(sparse, dense)
    columns = dense.shape[1]
    padded = -columns % DENSE_MULTIPLE
    if padded:
        dense = torch.nn.functional.pad(dense, (0, padded))
    product = torch._cslt_sparse_mm(torch._cslt_compress(sparse), dense, transpose_result=True)
    return product[:columns] if padded else product


@semi_sparse_mm_t.register_fake
def _semi_sparse_mm_t_fake(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return dense.new_empty((dense.shape[1], sparse.shape[0]))


def semi_sparse_mm_t_reference(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """The dense product the sparse kernel must match."""
    return (sparse @ dense).t().contiguous()


class _SemiSparseLinear(torch.autograd.Function):
    """``linear(x, weight, bias)`` with the products a 2:4 weight allows on the sparse cores."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, transposable):  # type: ignore[override]
        dtype = _compute_dtype(x)
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        w = weight.to(dtype)
        out = semi_sparse_mm_t(w, rows.t())
        if bias is not None:
            out = out + bias.to(dtype)
        # The input-gradient product reads W^T: kept ready (its 2:4 rows) when it runs sparse.
        ctx.save_for_backward(rows, w.t().contiguous() if transposable else w)
        ctx.transposable = transposable
        ctx.meta = (x.shape, weight.dtype, None if bias is None else bias.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):  # type: ignore[override]
        rows, w = ctx.saved_tensors
        x_shape, weight_dtype, bias_dtype = ctx.meta
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(rows.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = semi_sparse_mm_t(w, grad.t()) if ctx.transposable else grad @ w
            grad_x = grad_x.reshape(x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = (grad.t() @ rows).to(weight_dtype)
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0).to(bias_dtype)
        return grad_x, grad_w, grad_b, None


def semi_sparse_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposable: bool
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a 2:4 ``weight`` (``(out, in)``): the forward product on
    the sparse tensor cores, and the input-gradient product too when ``transposable`` says
    ``weight^T`` is 2:4 as well. Under autocast it computes in the autocast dtype, as linear does."""
    return _SemiSparseLinear.apply(x, weight, bias, transposable)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype
