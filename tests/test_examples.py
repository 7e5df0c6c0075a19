"""Every example a user copies runs as a script at a tiny size and ends its RESU schedule exactly.

Each runs in a subprocess, the way a user runs it (``python examples/X.py``, the DDP one through
``torch.distributed.run``), with this checkout first on the path.
"""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
SPARSITY = 0.7
TIMEOUT_S = 240

# A row of the report's managed-weights table: name, shape (AxB...), ops, sparsity, active.
MANAGED_ROW = re.compile(r"^(\S+)\s+(\d+(?:x\d+)+)\s+\S+\s+[\d.]+\s+(\d+)\s*$", re.MULTILINE)


def _run(*args: str, tmp_path: Path) -> str:
    """Run ``python *args``; output goes to files, not pipes: a compile worker that outlives the
    script (Inductor keeps a pool) would hold a pipe open and the wait for its end would hang."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        result = subprocess.run(
            [sys.executable, *args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            timeout=TIMEOUT_S,
            check=False,
        )
    output = out.read_text()
    assert result.returncode == 0, output[-3000:] + err.read_text()[-3000:]
    return output


def _managed(report: str) -> dict[str, tuple[int, int]]:
    """``{name: (numel, active)}`` from the report's managed-weights table."""
    return {
        name: (math.prod(int(d) for d in shape.split("x")), int(active))
        for name, shape, active in MANAGED_ROW.findall(report)
    }


def _assert_done_at_sparsity(output: str, expected: set[str]) -> None:
    assert "phase=done" in output
    managed = _managed(output)
    assert expected <= set(managed), managed
    numel = sum(n for n, _ in managed.values())  # the default global rule: the total is exact
    assert sum(a for _, a in managed.values()) == int((1 - SPARSITY) * numel), managed


def test_plain_loop(tmp_path: Path) -> None:
    output = _run(
        str(EXAMPLES / "plain_loop.py"),
        "--steps",
        "30",
        "--sparsity",
        str(SPARSITY),
        tmp_path=tmp_path,
    )
    _assert_done_at_sparsity(output, {"0.weight", "2.weight", "4.weight"})
    (accuracy,) = re.findall(r"accuracy on 1024 fresh samples: ([\d.]+)", output)
    assert 0.0 <= float(accuracy) <= 1.0


def test_cnn_small(tmp_path: Path) -> None:
    output = _run(str(EXAMPLES / "cnn.py"), "--model", "small", "--steps", "20", tmp_path=tmp_path)
    assert output.startswith("small CNN")
    # The classifier head's Linear weights; whether convolutions are managed is the pass's call.
    _assert_done_at_sparsity(output, {"7.weight", "9.weight"})


def _torchrun(script: str, tmp_path: Path) -> str:
    """An example on two CPU ranks through torchrun, 20 steps."""
    return _run(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(EXAMPLES / script),
        "--steps",
        "20",
        tmp_path=tmp_path,
    )


def test_ddp_two_ranks_agree_on_masks(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed")
    output = _torchrun("ddp.py", tmp_path)
    hashes = dict(re.findall(r"rank (\d)/2: mask hash ([0-9a-f]+)", output))
    assert set(hashes) == {"0", "1"}, output
    assert hashes["0"] == hashes["1"]
    assert "masks agree on all 2 ranks" in output
    _assert_done_at_sparsity(output, {"0.weight", "2.weight"})


def test_fsdp_two_ranks_reach_the_target(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.fsdp")
    output = _torchrun("fsdp.py", tmp_path)
    assert "phase done" in output
    (line,) = re.findall(r"whole-weight sparsity after the last commit: (.*)", output)
    sparsities = ast.literal_eval(line)
    assert set(sparsities) == {"0.weight", "2.weight", "4.weight"}
    (overall,) = re.findall(r"model sparsity after the last commit: (.*)", output)
    assert abs(float(overall) - 0.7) < 1e-3  # the default global rule: the total is exact
