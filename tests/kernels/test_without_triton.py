"""``import resu_compile`` and CPU training need no Triton: the kernels are imported on first need.

A subprocess blocks ``triton`` (``sys.modules["triton"] = None`` makes every import of it fail),
then imports resu_compile and trains a tiny model through a prune and its RESU phase, Adam and SGD,
every managed update on the references; the masks must hold and the Triton modules stay unloaded.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys

    sys.modules["triton"] = None
    import torch

    import resu_compile as resu

    for make_optimizer in (
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    ):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        compiled = resu.compile(model, sparsity=0.5, cycles=1, steps_per_cycle=10, compiler="eager")
        optimizer = make_optimizer(model.parameters())
        for _ in range(10):
            x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(compiled(x), y).backward()
            compiled.resu.step(optimizer)
        assert compiled.resu.resu_steps > 0, "the schedule never reached the RESU phase"
        for name, mask in compiled.resu.masks().items():
            weight = dict(model.named_parameters())[name]
            assert not mask.all() and torch.all(weight[~mask] == 0), name
    loaded = [m for m in sys.modules if m.startswith("resu_compile.kernels.triton")]
    assert not loaded, loaded
    print("trained without triton")
    """
)


def test_import_and_cpu_training_work_without_triton() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "trained without triton" in done.stdout
