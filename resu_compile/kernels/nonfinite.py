"""Whether any of many tensors holds a NaN or an Inf, as a device flag, in one launch.

Before the managed updates of a step, the bridge checks every managed gradient (``nan_policy``
"skip" drops the step's managed updates if one is not finite). The verdict stays on the device, a
1-element float32 flag that the update kernels read as torch's fused optimizers read GradScaler's
``found_inf``, so nothing waits for it. Built from ``torch._foreach_norm``, a stack, a max and
casts, the check costs the host a dozen launches and an output tensor per weight; on a model whose
step is bound by the host (ViT-B: the host spends as long launching a step as the GPU running it)
that time is added to every step. Here it is one launch per dtype that reads each tensor once
(:mod:`resu_compile.kernels.triton.nonfinite`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resu_compile.kernels.launch import FLOAT_DTYPES, on_gpu


def any_nonfinite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 1-element float32 tensor on ``tensors[0]``'s device: 1 if any tensor holds NaN or Inf.

    Contiguous CUDA tensors of a floating dtype take one Triton launch per (device, dtype); the
    rest take :func:`any_nonfinite_reference`. Nothing syncs the host.
    """
    if not tensors:
        raise ValueError("any_nonfinite: tensors must not be empty")
    flag = torch.zeros(1, dtype=torch.float32, device=tensors[0].device)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    rest = []
    for tensor in tensors:
        fused = tensor.numel() and tensor.is_contiguous() and tensor.dtype in FLOAT_DTYPES
        if fused and on_gpu([tensor]):
            groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
        elif tensor.numel():
            rest.append(tensor)
    if groups:
        from resu_compile.kernels.triton.nonfinite import any_nonfinite_triton_

        for (device, dtype), members in groups.items():
            if device == flag.device:
                any_nonfinite_triton_(members, dtype, flag)
            else:
                elsewhere = torch.zeros(1, dtype=torch.float32, device=device)
                any_nonfinite_triton_(members, dtype, elsewhere)
                flag = torch.maximum(flag, elsewhere.to(flag.device))
    if rest:
        flag = torch.maximum(flag, any_nonfinite_reference(rest).to(flag.device))
    return flag


def any_nonfinite_reference(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reference: 1-element float32 on ``tensors[0]``'s device, 1 if any holds NaN or Inf."""
    device = tensors[0].device
    finite = torch.stack([torch.isfinite(t).all().to(device) for t in tensors]).all()
    return (~finite).to(torch.float32).reshape(1)
