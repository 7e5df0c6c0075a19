"""What every benchmark result records: where and when it was measured."""

from __future__ import annotations

import datetime
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """Device, library versions and UTC date of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def timed_ms(fn: Callable[[], object]) -> float:
    """Wall-clock milliseconds of ``fn`` from an idle GPU to its work done (synchronised on both
    sides, the current CUDA device; on a machine without one, plain wall-clock): what a caller
    waits for a step or a transition."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def alternated(
    ours: Callable[[], object], baseline: Callable[[], object], rounds: int = 12, block: int = 5
) -> dict[str, float]:
    """Step times of ``ours`` and of a ``baseline``, alternating blocks of ``block`` calls.

    Alternating puts both under the same conditions (clocks, allocator, the host's load), so their
    ratio is the overhead. The host's speed drifts between blocks more than within one, so the
    ratio is the median of the per-round ratios of block medians, with its quartiles.
    """
    for _ in range(2):
        ours()
        baseline()
    mine: list[float] = []
    theirs: list[float] = []
    ratios: list[float] = []
    for _ in range(rounds):
        ours_block = [timed_ms(ours) for _ in range(block)]
        baseline_block = [timed_ms(baseline) for _ in range(block)]
        mine += ours_block
        theirs += baseline_block
        ratios.append(statistics.median(ours_block) / statistics.median(baseline_block))
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        "ms": statistics.median(mine),
        "dense_ms": statistics.median(theirs),
        "ratio": statistics.median(ratios),
        "ratio_p25": quartiles[0],
        "ratio_p75": quartiles[2],
    }
