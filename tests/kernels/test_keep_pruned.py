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


def _theta_rides(dtype: torch.dtype, device: str, user_wd: float, theta_wd: float) -> None:
    """Theta's AdamW riding on the actives' pass equals the two passes: bit for bit in the
    interpreter, within rounding on the GPU."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(5, 37, 23), (64, 33), (3,)]
    masks = [torch.rand(s, generator=gen) < 0.5 for s in shapes]
    selections = [~m & (torch.rand(m.shape, generator=gen) < 0.3) for m in masks]

    def tensors(scale: float, positive: bool = False) -> list[torch.Tensor]:
        values = [torch.randn(s, generator=gen) * scale for s in shapes]
        return [(v.abs() if positive else v).to(device, dtype) for v in values]

    params, grads, exp_avgs, exp_avg_sqs = tensors(1), tensors(1), tensors(0.1), tensors(0.01, True)
    mask_bits = [pack_bits(m).to(device) for m in masks]
    select_bits = [pack_bits(s).to(device) for s in selections]
    user = {**ADAM, "beta2": 0.95, "weight_decay": user_wd}
    theta = dict(lr=1e-2, step=2, beta1=0.8, beta2=0.99, weight_decay=theta_wd)
    one = [[t.clone() for t in row] for row in (params, exp_avgs, exp_avg_sqs)]
    two = [[t.clone() for t in row] for row in (params, exp_avgs, exp_avg_sqs)]
    fused_update.fused_masked_adam_multi_(
        one[0], grads, one[1], one[2], mask_bits, keep_pruned=True,
        theta=fused_update.ThetaAdamW(select_bits, **theta), **user,
    )  # fmt: skip
    fused_update.fused_masked_adam_multi_(
        two[0], grads, two[1], two[2], mask_bits, keep_pruned=True, **user
    )
    fused_update.fused_theta_update_multi_(
        two[0], grads, select_bits, rule="adamw", exp_avgs=two[1], exp_avg_sqs=two[2], **theta
    )
    for row_one, row_two in zip(one, two, strict=True):
        for a, b in zip(row_one, row_two, strict=True):
            # The very same arithmetic: interpreted, or compiled without FMA contraction.
            assert torch.equal(a, b)


@pytest.mark.parametrize(("user_wd", "theta_wd"), [(0.1, 0.0), (0.0, 0.05), (0.01, 0.02)])
def test_theta_rides_on_the_actives_pass_cpu(user_wd: float, theta_wd: float) -> None:
    for dtype in (torch.float32, torch.float16):
        _theta_rides(dtype, "cpu", user_wd, theta_wd)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_theta_rides_on_the_actives_pass_gpu(dtype: torch.dtype) -> None:
    _theta_rides(dtype, "cuda", 0.1, 0.02)


def test_theta_rider_needs_keep_pruned_and_decoupled_decay() -> None:
    p = [torch.zeros(8)]
    bits = [torch.zeros(1, dtype=torch.uint8)]
    theta = fused_update.ThetaAdamW(bits, lr=1e-3, step=1)
    for bad in ({"keep_pruned": False}, {"decoupled_weight_decay": False}, {"maximize": True}):
        kwargs = {**ADAM, "keep_pruned": True, **bad}
        with pytest.raises(ValueError, match="theta needs"):
            fused_update.fused_masked_adam_multi_(p, p, p, p, bits, theta=theta, **kwargs)
