"""The price and the gain of 2:4 sparse phases on the sparse tensor cores (``semi_sparse=True``).

Two parts, both on one CUDA GPU, every ratio against dense measured in the same process:

- ``kernels``: for each linear shape of the models below, at 8192 tokens, inside a CUDA graph (so
  no host set-up is timed): the dense products of a linear layer (forward ``x W^T``, input
  gradient ``g W``, weight gradient ``g^T x``), cuSPARSELt's 2:4 products (with and without its
  fused transposed output), and refreshing the compressed weight (``_cslt_compress`` of ``W``, and
  of ``W^T`` for the input gradient). ``layer_ratio`` is a training step's three products plus the
  two compressions over the three dense products: what the semi-sparse layer can reach at best.
- ``models``: a Llama-style decoder with FFN-heavy shapes (``transformers`` LlamaForCausalLM from a
  config: hidden 2048, FFN 5632, 8 layers, 8192 tokens a step), a GPT-2-small-sized decoder and a
  ViT-B-sized encoder (bf16 autocast, fused AdamW): step time of the 2:4 sparse phase under
  ``resu.compile(pattern="2:4", semi_sparse=True)`` (transposable mask and not) and with the
  products dense (``semi_sparse=False``), against dense ``torch.compile`` with and without CUDA
  graphs (``mode="reduce-overhead"``: the semi-sparse variants run under CUDA graphs, so that
  baseline is the fair one), and peak memory.

Usage (GPU machine): ``python benchmarks/semi_sparse.py [--out benchmarks/results/semi_sparse.json]
[--models llama,gpt2,vit] [--steps 20]``. Results are written after every model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import alternated, environment, timed_ms, write_json
from benchmarks.models import GPT, GPT2_SMALL, VIT_BASE, ViT

TOKENS = 8192
LLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, "heads": 16}
#: (out, in) of every managed linear shape of the three models.
SHAPES = {
    "llama": [(2048, 2048), (5632, 2048), (2048, 5632)],
    "gpt2": [(2304, 768), (768, 768), (3072, 768), (768, 3072)],
    "vit": [(2304, 768), (768, 768), (3072, 768), (768, 3072)],
}
#: resu.compile configurations of the 2:4 sparse phase, by row name.
SPARSE_CONFIGS = {
    "2:4, products dense": {"semi_sparse": False},
    "2:4 semi-sparse, transposable": {"semi_sparse": True, "transposable": True},
    "2:4 semi-sparse, forward only": {"semi_sparse": True, "transposable": False},
}


def graph_ms(fn: Callable[[], object], replays: int = 50) -> float:
    """Milliseconds of one replay of ``fn`` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def kernel_row(out_features: int, in_features: int) -> dict[str, Any]:
    """One shape's dense and 2:4 products and compressions, in CUDA graphs (ms)."""
    from resu_compile.method.pruning import transposable_nm_mask

    weight = torch.randn(out_features, in_features, device="cuda")
    weight = (weight * transposable_nm_mask(weight.abs(), 2, 4)).bfloat16()
    x = torch.randn(TOKENS, in_features, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(TOKENS, out_features, device="cuda", dtype=torch.bfloat16)
    packed = torch._cslt_compress(weight)
    packed_t = torch._cslt_compress(weight.t().contiguous())
    row: dict[str, Any] = {"shape": f"{out_features}x{in_features}"}
    row["dense_forward"] = graph_ms(lambda: x @ weight.t())
    row["dense_input_grad"] = graph_ms(lambda: grad @ weight)
    row["dense_weight_grad"] = graph_ms(lambda: grad.t() @ x)
    row["sparse_forward"] = graph_ms(lambda: torch._cslt_sparse_mm(packed, x.t()))
    row["sparse_forward_transposed_out"] = graph_ms(
        lambda: torch._cslt_sparse_mm(packed, x.t(), transpose_result=True)
    )
    row["sparse_input_grad_transposed_out"] = graph_ms(
        lambda: torch._cslt_sparse_mm(packed_t, grad.t(), transpose_result=True)
    )
    row["compress"] = graph_ms(lambda: torch._cslt_compress(weight))
    row["compress_transposed"] = graph_ms(lambda: torch._cslt_compress(weight.t().contiguous()))
    dense = row["dense_forward"] + row["dense_input_grad"] + row["dense_weight_grad"]
    products = (
        row["sparse_forward_transposed_out"]
        + row["sparse_input_grad_transposed_out"]
        + row["dense_weight_grad"]
    )
    row["layer_ratio_without_compression"] = products / dense
    row["layer_ratio"] = (products + row["compress"] + row["compress_transposed"]) / dense
    return row


def build(model_name: str) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor]]:
    """A fresh model on the GPU (seed 0) and its loss on a fixed batch."""
    torch.manual_seed(0)
    if model_name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=LLAMA["hidden_size"],
            intermediate_size=LLAMA["intermediate_size"],
            num_hidden_layers=LLAMA["num_hidden_layers"],
            num_attention_heads=LLAMA["heads"],
            num_key_value_heads=LLAMA["heads"],
            vocab_size=32000,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
        config._attn_implementation = "sdpa"
        model = LlamaForCausalLM(config).cuda()
        tokens = torch.randint(0, 32000, (TOKENS // 2048, 2048), device="cuda")
        return model, lambda m: m(tokens, labels=tokens).loss
    if model_name == "gpt2":
        model = GPT(GPT2_SMALL, 50304, 1024).cuda()
        tokens = torch.randint(0, 50304, (TOKENS // 1024, 1025), device="cuda")

        def lm_loss(m: torch.nn.Module) -> torch.Tensor:
            logits = m(tokens[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

        return model, lm_loss
    model = ViT(VIT_BASE, image=224, patch=16, channels=3, classes=1000).cuda()
    images = torch.randn(TOKENS // 196, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (TOKENS // 196,), device="cuda")
    return model, lambda m: F.cross_entropy(m(images).float(), labels)


class Run:
    """One model trained by one configuration: ``step()`` is forward, backward, optimizer."""

    def __init__(self, model_name: str, config: dict[str, Any] | str) -> None:
        torch.cuda.synchronize()
        self.allocated_before = torch.cuda.memory_allocated()  # other runs' memory, not ours
        self.model, self.loss_fn = build(model_name)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.controller = None
        if isinstance(config, str):  # a dense torch.compile mode
            self.compiled = torch.compile(self.model, mode=config or None)
        else:
            import resu_compile as resu

            self.compiled = resu.compile(
                self.model, sparsity=0.5, pattern="2:4", manual=True, exclude="lm_head*", **config
            )
            self.controller = self.compiled.resu

    def step(self) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = self.loss_fn(self.compiled)
        loss.backward()
        if self.controller is None:
            self.optimizer.step()
        else:
            self.controller.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)

    def peak_MiB(self, steps: int = 3) -> float:
        """Peak memory of this run's steps, beyond what the process held before it was built."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            self.step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self.allocated_before) / 2**20


def model_rows(model_name: str, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every 2:4 configuration's sparse phase against both dense baselines, in this process;
    ``save`` gets the rows so far after each one."""
    baselines = {
        "dense": Run(model_name, ""),
        "dense, CUDA graphs": Run(model_name, "reduce-overhead"),
    }
    result: dict[str, Any] = {"dense": {}, "sparse": {}}
    for name, run in baselines.items():
        run.step()
        result["dense"][name] = {"ms": statistics.median(timed_ms(run.step) for _ in range(10))}
        result["dense"][name]["peak_MiB"] = run.peak_MiB()
    for name, config in SPARSE_CONFIGS.items():
        run = Run(model_name, config)
        run.step()  # compiles the dense variant
        run.controller.prune(0.5)
        run.step()
        row = {
            against: alternated(run.step, baseline.step, rounds=6, block=4)
            for against, baseline in baselines.items()
        }
        row["peak_MiB"] = run.peak_MiB()
        row["products"] = sorted({w.semi_sparse_products or "-" for w in run.controller.state})
        result["sparse"][name] = row
        save(result)
        del run
        torch.cuda.empty_cache()
    return result


def report(result: dict[str, Any], tablefmt: str = "simple") -> str:
    """The kernel table and the model table of a result."""
    kernel_table = [
        [
            model,
            k["shape"],
            f"{k['dense_forward']:.3f}",
            f"{k['sparse_forward']:.3f}",
            f"{k['sparse_forward_transposed_out']:.3f}",
            f"{k['compress']:.3f}",
            f"{k['compress_transposed']:.3f}",
            f"{k['layer_ratio_without_compression']:.3f}",
            f"{k['layer_ratio']:.3f}",
        ]
        for model, rows in result["kernels"].items()
        for k in rows
    ]
    model_table = []
    for model, runs in result["models"].items():
        for name, row in runs["sparse"].items():
            baseline = "dense, CUDA graphs" if SPARSE_CONFIGS[name]["semi_sparse"] else "dense"
            dense_peak = runs["dense"][baseline]["peak_MiB"]
            model_table.append(
                [
                    model,
                    name,
                    f"{row['dense']['ratio']:.3f}",
                    f"{row['dense, CUDA graphs']['ratio']:.3f}",
                    f"{row['peak_MiB'] / dense_peak:.3f}",
                ]
            )
    return "\n\n".join(
        [
            tabulate(
                kernel_table,
                headers=[
                    "model",
                    "W (out x in)",
                    "dense fwd ms",
                    "2:4 fwd ms",
                    "2:4 fwd, (x W^T) layout",
                    "compress W",
                    "compress W^T",
                    "layer, no compress",
                    "layer",
                ],
                tablefmt=tablefmt,
            ),
            tabulate(
                model_table,
                headers=[
                    "model",
                    "2:4 sparse phase",
                    "step / dense",
                    "step / dense (CUDA graphs)",
                    "peak / dense (same CUDA-graph use)",
                ],
                tablefmt=tablefmt,
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/semi_sparse.json"))
    parser.add_argument("--models", default="llama,gpt2,vit")
    args = parser.parse_args()
    models = args.models.split(",")
    result: dict[str, Any] = {
        **environment(),
        "command": "python benchmarks/semi_sparse.py " + " ".join(sys.argv[1:]),
        "tokens": TOKENS,
        "kernels": {m: [kernel_row(*shape) for shape in SHAPES[m]] for m in models},
        "models": {},
    }
    write_json(args.out, result)
    for model_name in models:

        def save(rows: dict[str, Any], model_name: str = model_name) -> None:
            result["models"][model_name] = rows
            write_json(args.out, result)

        model_rows(model_name, save)
        print(report(result), flush=True)


if __name__ == "__main__":
    main()
