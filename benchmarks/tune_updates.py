"""Launch configurations of the fused update kernels, swept: the evidence for LAUNCH_CONFIGS.

For each element size, the update kernels of ``benchmarks/kernels.py`` are timed on the same
tensors, as a share of the copy bandwidth measured in the same run: under every ``(BLOCK,
num_warps)`` candidate set in ``kernels.launch.LAUNCH_CONFIGS`` (for the plain updates and the
one-pass RESU step), then under the defaults with ``kernels.launch.FP_FUSION`` flipped. Usage (GPU
machine):

    python -m benchmarks.tune_updates [--out benchmarks/results/tune_updates.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tabulate import tabulate

from benchmarks.common import environment, write_json
from benchmarks.kernels import _copy_ceiling_gbps, _median_ms, _update_cases
from resu_compile.kernels import launch

SHAPE = (4096, 4096)
# (BLOCK, num_warps) candidates, from 2 to 32 elements a thread.
CANDIDATES = [
    (512, 4),
    (1024, 2),
    (1024, 4),
    (1024, 8),
    (2048, 4),
    (2048, 8),
    (2048, 16),
    (4096, 8),
]
# Each kernel timed, and whether it is the one-pass RESU step (its own entry in LAUNCH_CONFIGS).
KERNELS = {
    "masked AdamW": False,
    "theta AdamW, all selected": False,
    "RESU step, one pass (AdamW + theta AdamW)": True,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tune_updates.json"))
    parser.add_argument("--dtypes", default="bfloat16,float32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/tune_updates.py needs a CUDA GPU")
    ceiling = _copy_ceiling_gbps()
    default = dict(launch.LAUNCH_CONFIGS)
    rows = []
    fusion = launch.FP_FUSION
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        size = dtype.itemsize
        # Every candidate with the default FP_FUSION, then the defaults with the other setting.
        runs = [(config, fusion) for config in CANDIDATES] + [(None, not fusion)]
        for config, fp_fusion in runs:
            launch.FP_FUSION = fp_fusion
            for theta in (False, True):
                launch.LAUNCH_CONFIGS[size, theta] = config or default[size, theta]
            for name, nbytes, fn in _update_cases(SHAPE, dtype):
                if name not in KERNELS or nbytes is None:
                    continue
                block, warps = launch.LAUNCH_CONFIGS[size, KERNELS[name]]
                ms = _median_ms(fn)
                rows.append(
                    {
                        "dtype": str(dtype).removeprefix("torch."),
                        "BLOCK": block,
                        "warps": warps,
                        "elements/thread": block // (32 * warps),
                        "fp fusion": fp_fusion,
                        "default": fp_fusion == fusion
                        and (block, warps) == default[size, KERNELS[name]],
                        "kernel": name,
                        "ms": ms,
                        "% of copy": 100 * nbytes / ms / 1e6 / ceiling,
                    }
                )
            torch.cuda.empty_cache()
        launch.LAUNCH_CONFIGS.update(default)
        launch.FP_FUSION = fusion
    result = {**environment(), "copy_ceiling_GBps": ceiling, "shape": SHAPE, "rows": rows}
    write_json(args.out, result)
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}")
    print(f"copy ceiling {ceiling:.0f} GB/s; shape {SHAPE}")
    print(tabulate(rows, headers="keys", floatfmt=".4g"))


if __name__ == "__main__":
    main()
