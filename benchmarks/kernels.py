"""Bandwidth of the fused masked updates, sort-free top-k and the inline W_eff matmul (GPU only).

The update kernels are memory bound, so the figure of merit is achieved bandwidth against the copy
ceiling measured in the same run (a large device-to-device ``copy_``, bytes read + written). Bytes
are counted as the kernel must move them: parameter read + write, gradient read, each state read +
write, and N/8 bytes of mask. Masks are random at 50% density, which still touches every 32-byte
sector, so the dense byte count is the traffic. A theta step on a 20% selection skips most sectors,
so it is reported as time only. Times are ``triton.testing.do_bench`` medians (L2 flushed per run).

The multi-tensor case times the RESU phase's theta step over GPT-2-small's 48 managed weights (bf16,
20% selected) as 48 per-weight ``fused_theta_update_`` calls against one
``fused_theta_update_multi_``, Python included: ``host ms`` is the time for the calls to return
(queue idle at the start: the CPU cost of the step), ``wall ms`` the time from an idle GPU to the
work done (``torch.cuda.synchronize`` on both sides), both ``time.perf_counter`` medians; ``do_bench
ms`` is do_bench's median of the same callable.

The inline case times one linear layer ``tokens x in -> out`` in bf16 whose weight is kept apart
from theta (``W_eff = where(M, W, Theta)``, mask packed as bits, 50% random): forward and forward +
backward (``torch.autograd.grad`` of ``Y`` against a fixed ``dY``) of cuBLAS ``F.linear`` on the
in-place ``W`` (the dense baseline: in-place storage IS ``W_eff``), of materializing ``W_eff`` then
cuBLAS (eager, and fused into one Inductor kernel), and of the inline Triton kernels
(:mod:`resu_compile.kernels.inline_matmul`; the first call autotunes them, before timing). The
``x, theta`` rows are the RESU phase with frozen actives (no weight gradient). ``TFLOP/s`` counts
``2 * tokens * in * out`` per matmul; ``peak MB`` is the peak allocation of one forward + backward
above what was allocated before it (inputs resident), ``+MB vs dense`` its excess over the cuBLAS
row; ``max err`` the largest difference of the forward output to the eager materialized one
(blank for the dense row, which computes with ``W`` alone).

Usage (on the GPU machine): ``python -m benchmarks.kernels [--out benchmarks/results/kernels.json]
[--only inline ...]``. With ``--only`` just the named sections run and, if ``--out`` exists, they
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
import torch.nn.functional as F
import triton
from tabulate import tabulate
from triton.testing import do_bench

from resu_compile.kernels import fused_update, inline_matmul
from resu_compile.kernels.bits import pack_bits, unpack_bits
from resu_compile.kernels.fused_update import (
    ThetaAdamW,
    fused_masked_adam_,
    fused_masked_adam_multi_,
    fused_masked_sgd_,
    fused_theta_update_,
    fused_theta_update_multi_,
)
from resu_compile.kernels.select import count_at_least, topk_threshold_approx

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
# Inline W_eff matmul: (tokens, in, out) of one linear layer, bf16, 50% random mask.
INLINE_SHAPES = [(8192, 4096, 4096), (8192, 768, 3072)]
INLINE_DENSITY = 0.5
# --only choices -> key of the JSON result.
SECTIONS = {"updates": "updates", "multi": "multi_tensor", "topk": "topk", "inline": "inline"}


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
    theta_kw = dict(rule="adamw", lr=1e-4, step=10, exp_avg=m, exp_avg_sq=v, weight_decay=1e-2)
    theta_sel = pack_bits(~mask & (torch.rand(shape, generator=gen, device="cuda") < 0.2))
    rider = ThetaAdamW([theta_sel], lr=1e-4, step=10, weight_decay=1e-2)
    steps = torch.zeros((), dtype=torch.float32, device="cuda")
    return [
        (
            "masked SGD momentum",
            5 * es * n + mask_bytes,
            lambda: fused_masked_sgd_(p, g, m, bits, **sgd_kw),
        ),
        (
            "masked AdamW",
            7 * es * n + mask_bytes,
            lambda: fused_masked_adam_(p, g, m, v, bits, **adam_kw),
        ),
        (
            "theta AdamW, all selected",
            7 * es * n + mask_bytes,
            lambda: fused_theta_update_(p, g, dense_bits, **theta_kw),
        ),
        (
            "theta AdamW, 20% selected",
            None,
            lambda: fused_theta_update_(p, g, sparse_sel, **theta_kw),
        ),
        (
            "RESU step, one pass (AdamW + theta AdamW rider)",
            7 * es * n + 2 * mask_bytes,
            lambda: fused_masked_adam_multi_(
                [p], [g], [m], [v], [bits], keep_pruned=True, theta=rider, **adam_kw
            ),
        ),
        (
            "RESU step, two passes (AdamW, then theta AdamW)",
            None,
            lambda: (
                fused_masked_adam_(p, g, m, v, bits, keep_pruned=True, **adam_kw),
                fused_theta_update_(p, g, theta_sel, **theta_kw),
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
                fused_theta_update_(
                    p[i],
                    g[i],
                    sel[i],
                    exp_avg=m[i] if states else None,
                    exp_avg_sq=v[i] if states else None,
                    **kw,
                )

        def multi(kw=kw, states=states) -> None:
            fused_theta_update_multi_(
                p,
                g,
                sel,
                exp_avgs=m if states else None,
                exp_avg_sqs=v if states else None,
                **kw,
            )

        def multi_miss(multi=multi) -> None:
            fused_update._ADDRESS_TABLES.clear()  # as if every tensor had moved: one H2D copy
            multi()

        case = f"theta {rule}, 20% selected"
        cases += [
            (case, f"{len(p)} x fused_theta_update_", loop),
            (case, "1 x fused_theta_update_multi_", multi),
            (case, "1 x multi, address table rebuilt", multi_miss),
        ]
    adam_kw = dict(ADAM_HYPER)

    def adam_loop() -> None:
        for i in range(len(p)):
            fused_masked_adam_(p[i], g[i], m[i], v[i], mask[i], **adam_kw)

    def adam_multi() -> None:
        fused_masked_adam_multi_(p, g, m, v, mask, **adam_kw)

    cases += [
        ("masked AdamW, 50% mask", f"{len(p)} x fused_masked_adam_", adam_loop),
        ("masked AdamW, 50% mask", "1 x fused_masked_adam_multi_", adam_multi),
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
        t = topk_threshold_approx(values, k)
        error = (count_at_least(values, t) - k) / k
        cases = {
            "topk_threshold_approx": lambda k=k: topk_threshold_approx(values, k),
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
                    "count error": error if name == "topk_threshold_approx" else 0.0,
                }
            )
    return rows


class _InlineCase:
    """One variant of the inline-matmul comparison on one layer: a forward and the tensors whose
    gradients its backward computes."""

    def __init__(
        self,
        variant: str,
        forward: Callable[[], torch.Tensor],
        grads: dict[str, torch.Tensor],
        time_forward: bool = True,
    ) -> None:
        self.variant = variant
        self.forward = forward
        self.grads = tuple(grads.values())
        self.grad_names = ", ".join(grads)
        self.time_forward = time_forward

    def step(self, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Forward + backward (fresh gradients, no accumulation into ``.grad``)."""
        return torch.autograd.grad(self.forward(), self.grads, dy)


def _materialize(bits: torch.Tensor, weight: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """What the separate-theta storage costs naively: ``W_eff`` as a weight-sized temporary."""
    return torch.where(unpack_bits(bits, weight.shape), weight, theta)


_materialize_compiled = torch.compile(_materialize, dynamic=False)


def _inline_cases(
    shape: tuple[int, int, int],
) -> tuple[list[_InlineCase], torch.Tensor]:
    """The variants on fresh bf16 tensors of one ``(tokens, in, out)`` layer, and ``dY``."""
    tokens, in_f, out_f = shape
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device="cuda").to(torch.bfloat16)

    x = rand(tokens, in_f).requires_grad_()
    weight = (rand(out_f, in_f) * in_f**-0.5).requires_grad_()
    theta = (rand(out_f, in_f) * 0.1 * in_f**-0.5).requires_grad_()
    bits = pack_bits(torch.rand(out_f, in_f, generator=gen, device="cuda") < INLINE_DENSITY)
    dy = rand(tokens, out_f)

    def dense() -> torch.Tensor:
        return F.linear(x, weight)

    def eager() -> torch.Tensor:
        return F.linear(x, _materialize(bits, weight, theta))

    def fused() -> torch.Tensor:
        return F.linear(x, _materialize_compiled(bits, weight, theta))

    def inline() -> torch.Tensor:
        return inline_matmul.InlineLinear.apply(x, weight, bits, theta, None)

    all3, resu = {"x": x, "W": weight, "theta": theta}, {"x": x, "theta": theta}
    cases = [
        _InlineCase("cuBLAS F.linear, in-place W (dense)", dense, {"x": x, "W": weight}),
        _InlineCase("materialize W_eff (eager) + cuBLAS", eager, all3),
        _InlineCase("materialize W_eff (Inductor) + cuBLAS", fused, all3),
        _InlineCase("inline Triton", inline, all3),
        _InlineCase("materialize W_eff (eager) + cuBLAS", eager, resu, time_forward=False),
        _InlineCase("inline Triton", inline, resu, time_forward=False),
    ]
    return cases, dy


def _peak_mb(fn: Callable[[], object]) -> float:
    """Peak allocation of one call above what was allocated before it, in MiB."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _bench_inline() -> list[dict]:
    rows = []
    for shape in INLINE_SHAPES:
        tokens, in_f, out_f = shape
        flop = 2 * tokens * in_f * out_f
        cases, dy = _inline_cases(shape)
        with torch.no_grad():
            want = cases[1].forward().float()
        dense_fwd = dense_step = dense_peak = None
        for case in cases:
            err = None
            if case is not cases[0]:
                with torch.no_grad():
                    err = (case.forward().float() - want).abs().max().item()
            fwd_ms = None
            if case.time_forward:
                with torch.no_grad():
                    fwd_ms = _median_ms(case.forward)
            step_ms = _median_ms(lambda case=case, dy=dy: case.step(dy))
            peak = _peak_mb(lambda case=case, dy=dy: case.step(dy))
            # Forward, dX, and one matmul for W_eff's gradient however it is split (W, theta).
            step_flop = flop * (2 + ("x" in case.grad_names.split(", ")))
            if dense_step is None:
                dense_fwd, dense_step, dense_peak = fwd_ms, step_ms, peak
            rows.append(
                {
                    "shape": "x".join(map(str, shape)),
                    "variant": case.variant,
                    "grads": case.grad_names,
                    "fwd ms": fwd_ms,
                    "fwd TFLOP/s": None if fwd_ms is None else flop / fwd_ms / 1e9,
                    "fwd vs dense": None if fwd_ms is None else fwd_ms / dense_fwd,
                    "fwd+bwd ms": step_ms,
                    "fwd+bwd TFLOP/s": step_flop / step_ms / 1e9,
                    "fwd+bwd vs dense": step_ms / dense_step,
                    "peak MB": peak,
                    "+MB vs dense": peak - dense_peak,
                    "max err": err,
                }
            )
        del cases, dy
        torch.cuda.empty_cache()
    return rows


def inline_table(rows: list[dict]) -> str:
    """The inline rows as printed (``None``, e.g. no forward timing, as blank)."""
    return tabulate(
        [{k: ("" if v is None else v) for k, v in row.items()} for row in rows],
        headers="keys",
        floatfmt=".4g",
    )


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
    if "inline" in run:
        result["inline"] = _bench_inline()
        tables.append(inline_table(result["inline"]))
    for section in run:
        provenance[SECTIONS[section]] = env
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{env['gpu']}  torch {env['torch']}  triton {env['triton']}  -> {args.out}\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
