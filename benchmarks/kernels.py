"""Bandwidth of the masked update kernels and of segmented top-k (GPU only).

The update kernels are memory bound, so the figure of merit is achieved bandwidth against the copy
ceiling measured in the same run (a large device-to-device ``copy_``, bytes read + written). Bytes
are counted as the kernel must move them: parameter read + write, gradient read, each state read +
write, and N/8 bytes of mask. Masks are random at 50% density, which still touches every 32-byte
sector, so the dense byte count is the traffic. A theta step on a 20% selection skips most sectors,
so it is reported as time only. Times are ``triton.testing.do_bench`` medians (L2 flushed per run).

The multi-tensor case times the RESU phase's theta step over GPT-2-small's 48 managed weights (bf16,
20% selected) as 48 calls of ``theta_update_`` on one weight each against one call on all of them,
Python included: ``host ms`` is the time for the calls to return (queue idle at the start: the CPU
cost of the step), ``wall ms`` the time from an idle GPU to the work done
(``torch.cuda.synchronize`` on both sides), both ``time.perf_counter`` medians; ``do_bench ms`` is
do_bench's median of the same callable.

The top-k case times the exact segmented ``topk_bits`` (packed bits out) against ``torch.topk`` and
``torch.kthvalue`` on one tensor.

The column-norm case times the calibrate variant's sums of squares down a ``(tokens, features)``
bf16 activation (GPT-2-small's and the Llama-style decoder's widths) as the op does it and as
Inductor compiles the aten ops; ``GB/s`` is the bytes read over the time.

Usage (on the GPU machine): ``python -m benchmarks.kernels [--out benchmarks/results/kernels.json]
[--only updates ...]``. With ``--only`` just the named sections run and, if ``--out`` exists, they
replace those sections in it and keep the others; ``provenance`` records where and when each
section was measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from tabulate import tabulate
from triton.testing import do_bench

from resu_compile.kernels import launch
from resu_compile.kernels.bits import count_bits, pack_bits
from resu_compile.kernels.column_norms import column_sq_sums, column_sq_sums_reference
from resu_compile.kernels.masked_adam import ThetaAdamW, masked_adam_
from resu_compile.kernels.segmented_topk import topk_bits
from resu_compile.kernels.theta_update import theta_update_
from resu_compile.kernels.triton.masked_adam import masked_adam_triton_
from resu_compile.kernels.triton.masked_sgd import masked_sgd_triton_
from resu_compile.kernels.triton.theta_update import theta_update_triton_

SHAPES = [(4096, 4096), (16_000_000,)]  # the second is not a power of two: tail blocks count too
DTYPES = [torch.bfloat16, torch.float32]
COPY_BYTES = 1 << 30
TOPK_N = 1 << 24
# AdamW hyper-parameters of every Adam case (decoupled decay, as torch.optim.AdamW).
ADAM_HYPER = {
    "step": 10,
    "lr": 1e-4,
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 1e-8,
    "weight_decay": 1e-2,
    "decoupled_weight_decay": True,
    "maximize": False,
}
TOPK_FRACTIONS = [0.2, 0.5]  # alpha of selective RESU and k_screen of the consistency rule
# GPT-2-small's managed weights: per block attn c_attn, attn c_proj, mlp c_fc, mlp c_proj.
GPT2_SMALL_SHAPES = [(768, 2304), (768, 768), (3072, 768), (768, 3072)] * 12
MULTI_REPS = 200
COLUMN_NORM_SHAPES = [(8192, 768), (8192, 3072), (8192, 2048), (8192, 5632)]
# --only choices -> key of the JSON result.
SECTIONS = {
    "updates": "updates",
    "multi": "multi_tensor",
    "topk": "topk",
    "column_norms": "column_norms",
}


def _median_ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, return_mode="median"))


def _copy_ceiling_gbps() -> float:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / ms / 1e6


def _update_cases(
    shape: tuple[int, ...], dtype: torch.dtype
) -> list[tuple[str, int | None, Callable]]:
    """(name, bytes moved or None, callable) for each update kernel on fresh tensors."""
    n = 1
    for size in shape:
        n *= size
    es = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand() -> torch.Tensor:
        return torch.randn(shape, generator=gen, device="cuda").to(dtype)

    mask = torch.rand(shape, generator=gen, device="cuda") < 0.5
    bits = pack_bits(mask)
    dense_bits = pack_bits(torch.ones(shape, dtype=torch.bool, device="cuda"))
    sparse_sel = pack_bits(torch.rand(shape, generator=gen, device="cuda") < 0.2)
    p, g, m, v = rand() * mask, rand(), rand() * mask, rand().abs() * mask
    mask_bytes = bits.numel()
    adam_kw = dict(ADAM_HYPER)
    sgd_kw = dict(
        lr=1e-4,
        momentum=0.9,
        dampening=0.0,
        weight_decay=1e-4,
        nesterov=False,
        maximize=False,
        first_step=False,
    )
    theta_kw = dict(
        rule="adamw", lr=1e-4, step=10, exp_avgs=[m], exp_avg_sqs=[v], weight_decay=1e-2
    )
    theta_sel = pack_bits(~mask & (torch.rand(shape, generator=gen, device="cuda") < 0.2))
    same_pass = ThetaAdamW([theta_sel], lr=1e-4, step=10, weight_decay=1e-2)
    steps = torch.zeros((), dtype=torch.float32, device="cuda")
    return [
        (
            "masked SGD momentum",
            5 * es * n + mask_bytes,
            lambda: masked_sgd_triton_([p], [g], [m], [bits], **sgd_kw),
        ),
        (
            "masked AdamW",
            7 * es * n + mask_bytes,
            lambda: masked_adam_triton_([p], [g], [m], [v], [bits], **adam_kw),
        ),
        (
            "theta AdamW, all selected",
            7 * es * n + mask_bytes,
            lambda: theta_update_triton_([p], [g], [dense_bits], **theta_kw),
        ),
        (
            "theta AdamW, 20% selected",
            None,
            lambda: theta_update_triton_([p], [g], [sparse_sel], **theta_kw),
        ),
        (
            "RESU step, one pass (AdamW + theta AdamW)",
            7 * es * n + 2 * mask_bytes,
            lambda: masked_adam_triton_(
                [p], [g], [m], [v], [bits], keep_pruned=True, theta=same_pass, **adam_kw
            ),
        ),
        (
            "RESU step, two passes (AdamW, then theta AdamW)",
            None,
            lambda: (
                masked_adam_triton_([p], [g], [m], [v], [bits], keep_pruned=True, **adam_kw),
                theta_update_triton_([p], [g], [theta_sel], **theta_kw),
            ),
        ),
        (
            "torch _fused_adamw_ (dense, no mask)",
            7 * es * n,
            lambda: torch._fused_adamw_(
                [p],
                [g],
                [m],
                [v],
                [],
                [steps],
                lr=1e-4,
                beta1=0.9,
                beta2=0.999,
                weight_decay=1e-2,
                eps=1e-8,
                amsgrad=False,
                maximize=False,
            ),
        ),
    ]


def _bench_updates(ceiling: float) -> list[dict]:
    rows = []
    for shape in SHAPES:
        for dtype in DTYPES:
            for name, nbytes, fn in _update_cases(shape, dtype):
                ms = _median_ms(fn)
                gbps = None if nbytes is None else nbytes / ms / 1e6
                rows.append(
                    {
                        "kernel": name,
                        "shape": "x".join(map(str, shape)),
                        "dtype": str(dtype).removeprefix("torch."),
                        "ms": ms,
                        "bytes": nbytes,
                        "GB/s": gbps,
                        "% of copy": None if gbps is None else 100 * gbps / ceiling,
                    }
                )
            torch.cuda.empty_cache()
    return rows


def _host_and_wall_ms(fn: Callable[[], object], reps: int = MULTI_REPS) -> tuple[float, float]:
    """Medians of (time for ``fn`` to return, time until its GPU work is done), idle GPU at start."""
    host, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        returned = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        host.append(returned - start)
        wall.append(done - start)
    return 1e3 * statistics.median(host), 1e3 * statistics.median(wall)


def _multi_cases() -> list[tuple[str, str, Callable]]:
    """(case, variant, callable): per-weight loops against one multi-tensor launch."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(shape) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16)

    def bits(shape, density) -> torch.Tensor:
        return pack_bits(torch.rand(shape, generator=gen, device="cuda") < density)

    shapes = GPT2_SMALL_SHAPES
    p, g, m = [rand(s) for s in shapes], [rand(s) for s in shapes], [rand(s) for s in shapes]
    v = [rand(s).abs() for s in shapes]
    sel = [bits(s, 0.2) for s in shapes]
    mask = [bits(s, 0.5) for s in shapes]
    cases = []
    for rule in ("sgd", "adamw"):
        kw = dict(rule=rule, lr=1e-4, step=10, weight_decay=1e-2)
        states = rule == "adamw"

        def loop(kw=kw, states=states) -> None:
            for i in range(len(p)):
                theta_update_(
                    [p[i]],
                    [g[i]],
                    [sel[i]],
                    exp_avgs=[m[i]] if states else None,
                    exp_avg_sqs=[v[i]] if states else None,
                    **kw,
                )

        def multi(kw=kw, states=states) -> None:
            theta_update_(
                p,
                g,
                sel,
                exp_avgs=m if states else None,
                exp_avg_sqs=v if states else None,
                **kw,
            )

        def multi_miss(multi=multi) -> None:
            launch._addresses.cache_clear()  # as if every tensor had moved: one H2D copy
            multi()

        case = f"theta {rule}, 20% selected"
        cases += [
            (case, f"{len(p)} x theta_update_, one weight each", loop),
            (case, "1 x theta_update_, all weights", multi),
            (case, "1 x theta_update_, address table rebuilt", multi_miss),
        ]
    adam_kw = dict(ADAM_HYPER)

    def adam_loop() -> None:
        for i in range(len(p)):
            masked_adam_([p[i]], [g[i]], [m[i]], [v[i]], [mask[i]], **adam_kw)

    def adam_multi() -> None:
        masked_adam_(p, g, m, v, mask, **adam_kw)

    cases += [
        ("masked AdamW, 50% mask", f"{len(p)} x masked_adam_, one weight each", adam_loop),
        ("masked AdamW, 50% mask", "1 x masked_adam_, all weights", adam_multi),
    ]
    return cases


def _bench_multi() -> list[dict]:
    rows = []
    n = sum(s[0] * s[1] for s in GPT2_SMALL_SHAPES)
    for case, variant, fn in _multi_cases():
        fn()  # compile
        host, wall = _host_and_wall_ms(fn)
        rows.append(
            {
                "case": case,
                "variant": variant,
                "weights": len(GPT2_SMALL_SHAPES),
                "numel": n,
                "dtype": "bfloat16",
                "host ms": host,
                "wall ms": wall,
                "do_bench ms": _median_ms(fn),
            }
        )
    torch.cuda.empty_cache()
    return rows


def _bench_topk() -> list[dict]:
    values = torch.randn(
        TOPK_N, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda"
    ).abs()
    rows = []
    for fraction in TOPK_FRACTIONS:
        k = int(fraction * TOPK_N)
        error = (count_bits(topk_bits([values], [k])[0]) - k) / k
        cases = {
            "topk_bits (segmented, exact)": lambda k=k: topk_bits([values], [k]),
            "torch.topk (sorted=False)": lambda k=k: torch.topk(values, k, sorted=False),
            "torch.kthvalue": lambda k=k: torch.kthvalue(values, TOPK_N - k + 1),
        }
        for name, fn in cases.items():
            rows.append(
                {
                    "method": name,
                    "n": TOPK_N,
                    "k": k,
                    "ms": _median_ms(fn),
                    "count error": error if name.startswith("topk_bits") else 0.0,
                }
            )
    return rows


def _bench_column_norms() -> list[dict]:
    compiled = torch.compile(column_sq_sums_reference)
    rows = []
    for shape in COLUMN_NORM_SHAPES:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(column_sq_sums(x), compiled(x), rtol=1e-4, atol=1e-2)
        cases = {"column_sq_sums (Triton op)": column_sq_sums, "Inductor (aten ops)": compiled}
        for name, fn in cases.items():
            ms = _median_ms(lambda fn=fn, x=x: fn(x))
            gbps = x.numel() * x.element_size() / ms / 1e6
            rows.append({"method": name, "shape": str(shape), "ms": ms, "GB/s": gbps})
    return rows


def _environment() -> dict[str, str]:
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels.json"))
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(SECTIONS),
        help="run only these sections; with an existing --out, replace just them in it",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")

    run = args.only or list(SECTIONS)
    env = _environment()
    merge = args.only and args.out.exists()
    result = json.loads(args.out.read_text()) if merge else dict(env)
    provenance = result.setdefault("provenance", {})
    tables = []
    if "topk" in run:
        result["topk"] = _bench_topk()
        tables.append(tabulate(result["topk"], headers="keys", floatfmt=".4g"))
    if "updates" in run:
        ceiling = _copy_ceiling_gbps()
        result["copy_ceiling_GBps"] = ceiling
        result["updates"] = _bench_updates(ceiling)
        tables.append(f"copy ceiling: {ceiling:.0f} GB/s (read + write)")
        tables.append(tabulate(result["updates"], headers="keys", floatfmt=".4g"))
    if "multi" in run:
        result["multi_tensor"] = _bench_multi()
        tables.append(tabulate(result["multi_tensor"], headers="keys", floatfmt=".4g"))
    if "column_norms" in run:
        result["column_norms"] = _bench_column_norms()
        tables.append(tabulate(result["column_norms"], headers="keys", floatfmt=".4g"))
    for section in run:
        provenance[SECTIONS[section]] = env
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{env['gpu']}  torch {env['torch']}  triton {env['triton']}  -> {args.out}\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
