"""``keep_pruned``: the masked updates step the actives and leave pruned coordinates bit-identical.

The RESU phase with trainable actives runs them this way, so theta and its moments can stay in the
optimizer's own pruned slots. Checked for the reference and the Triton kernels (interpreter on CPU,
real kernels on GPU), per tensor and multi-tensor.
"""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels import fused_update, reference
from resu_compile.kernels.bits import pack_bits
from tests.kernels.test_fused_update import TOL

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SGD = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False)
ADAM = dict(
    step=3,
    lr=1e-2,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.1,
    decoupled_weight_decay=True,
    maximize=False,
)


def _inputs(rule: str, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(3)
    shape = (5, 37, 23)
    mask = torch.rand(shape, generator=gen) < 0.4
    count = 3 if rule == "sgd" else 4
    tensors = [torch.randn(shape, generator=gen) for _ in range(count)]
    if rule == "adam":
        tensors[3] = tensors[3].abs()
    return [t.to(device=device, dtype=dtype) for t in tensors], mask.to(device)


def _step(kernel, rule: str, tensors, bits, keep_pruned: bool) -> None:
    if rule == "sgd":
        kernel(*tensors, bits, first_step=False, keep_pruned=keep_pruned, **SGD)
    else:
        kernel(*tensors, bits, keep_pruned=keep_pruned, **ADAM)


def _check(rule: str, dtype: torch.dtype, device: str, multi: bool) -> None:
    original, mask = _inputs(rule, dtype, device)
    bits = pack_bits(mask)
    name = "masked_sgd_" if rule == "sgd" else "masked_adam_"
    zeroing = [t.clone() for t in original]
    _step(getattr(reference, name), rule, zeroing, bits, keep_pruned=False)
    kernels = [getattr(reference, name)]
    if multi:
        multi_kernel = getattr(fused_update, f"fused_{name}multi_")
        kernels.append(lambda *args, **kw: multi_kernel(*([a] for a in args), **kw))
    else:
        kernels.append(getattr(fused_update, f"fused_{name}"))
    for kernel in kernels:
        kept = [t.clone() for t in original]
        _step(kernel, rule, kept, bits, keep_pruned=True)
        for i in (0, *range(2, len(kept))):  # the gradient (index 1) is never written
            assert torch.equal(kept[i][~mask], original[i][~mask]), "a pruned slot changed"
            torch.testing.assert_close(kept[i][mask], zeroing[i][mask], **TOL[dtype])
            assert torch.count_nonzero(zeroing[i][~mask]) == 0


@pytest.mark.parametrize("multi", [False, True], ids=["per_tensor", "multi"])
@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_keep_pruned_cpu(rule: str, multi: bool) -> None:
    _check(rule, torch.float32, "cpu", multi)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("multi", [False, True], ids=["per_tensor", "multi"])
@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_keep_pruned_gpu(rule: str, multi: bool, dtype: torch.dtype) -> None:
    _check(rule, dtype, "cuda", multi)
