"""FSDP2 on CUDA (one GPU, NCCL, world size 1): the fused Triton paths take the local shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_distributed import _mlp, _sharded, _spawn

pytestmark = pytest.mark.gpu

# The Triton entry points a sharded run must reach, by kernel module.
KERNELS = {
    "masked_adam": "masked_adam_triton_",
    "masked_zero": "zero_where_clear_triton_",
    "nonfinite": "any_nonfinite_triton_",
    "theta_entry": "write_theta_triton_",
    "commit_bits": "commit_bits_triton",
}


def _cuda_body(rank: int, tmp_path: Path) -> dict[str, Any]:
    import importlib

    import resu_compile as resu
    from resu_compile.runtime.phase import Phase
    from resu_compile.shards import local

    calls = dict.fromkeys(KERNELS, 0)
    for module_name, function in KERNELS.items():
        module = importlib.import_module(f"resu_compile.kernels.triton.{module_name}")
        original = getattr(module, function)

        def counted(*args, _original=original, _name=module_name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(module, function, counted)

    model = resu.compile(
        _sharded(_mlp().cuda()), sparsity=0.7, cycles=2, total_steps=24, compiler="aot_eager"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(24):
        x = torch.randn(16, 12, device="cuda", generator=generator)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        model.resu.step(optimizer)
        if model.resu.phase is not Phase.RESU:
            for weight in model.resu.state:
                if weight.mask_bits is not None:
                    pruned = ~weight.mask()
                    assert (local(weight.param.detach())[pruned] == 0).all()
                    state = optimizer.state[weight.param]
                    assert (local(state["exp_avg"])[pruned] == 0).all()
    assert model.resu.phase is Phase.DONE
    assert all(w.shard is not None and w.param.is_cuda for w in model.resu.state)
    return calls


def test_fsdp2_cuda_paths_take_dtensor_shards(tmp_path: Path) -> None:
    (calls,) = _spawn(_cuda_body, tmp_path, world=1, backend="nccl")
    assert all(count > 0 for count in calls.values()), calls
