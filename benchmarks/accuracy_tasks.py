"""The tasks of the accuracy benchmark: model, data, training batches and held-out metric.

A :class:`Task` fixes everything a method must not change: the architecture, the data, the batch
order (from the seed), the optimizer step budget, the AdamW hyper-parameters and the evaluation.

* ``fmnist-mlp``: MLP 784-1024-1024-10 on Fashion-MNIST, test accuracy (10,000 images).
* ``fmnist-vit``: ViT (linear 4x4 patch embedding, width 192, 6 blocks, 3 heads) on Fashion-MNIST,
  test accuracy.
* ``kjv-gpt``: byte-level GPT (6 layers, width 384, 6 heads, context 256) on the King James Bible,
  validation perplexity on non-overlapping windows of the held-out tail.

Training sees only the training split; the metric reads only the held-out split.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.models import GPT, TransformerSize, ViT
from resu_examples import datasets
from resu_examples.datasets import ImageData

Batch = tuple[torch.Tensor, torch.Tensor]

GPT_CONTEXT = 256
EVAL_BATCH_IMAGES = 1000
EVAL_BATCH_WINDOWS = 64


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def build_mlp(
    hidden: tuple[int, ...] = (1024, 1024), inputs: int = 784, classes: int = 10
) -> nn.Module:
    """ReLU MLP ``inputs``-``hidden``-``classes``."""
    sizes = (inputs, *hidden, classes)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


class FlatImageViT(ViT):
    """:class:`benchmarks.models.ViT` fed with flattened single-channel square images."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(images.shape[-1])
        return super().forward(images.view(-1, 1, side, side))


def build_vit(
    layers: int = 6, width: int = 192, heads: int = 3, patch: int = 4, image: int = 28
) -> nn.Module:
    return FlatImageViT(
        TransformerSize(layers, width, heads), image=image, patch=patch, channels=1, classes=10
    )


def build_gpt(layers: int = 6, width: int = 384, heads: int = 6) -> nn.Module:
    """Byte-level GPT (vocabulary 256, lm_head tied to the byte embedding), GPT-2 initialisation.

    The initialisation matters here: with torch's default N(0, 1) embedding, the tied lm_head
    starts with logits of std ~sqrt(width) and a loss far above log(256).
    """
    model = GPT(TransformerSize(layers, width, heads), vocab=256, context=GPT_CONTEXT)
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue  # biases stay 0 and LayerNorm gains 1, as constructed
        std = 0.02
        if name.endswith(("proj.weight", "fc2.weight")):
            std /= math.sqrt(2 * layers)  # residual-branch outputs, as in GPT-2
        nn.init.normal_(param, std=std)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TextData:
    """Training bytes and held-out bytes, ``uint8`` on the training device."""

    train: torch.Tensor
    val: torch.Tensor


def load_fashion_mnist(data_dir: str | Path | None, device: torch.device) -> ImageData:
    path = datasets.find_fashion_mnist(data_dir)
    if path is None:
        raise FileNotFoundError("Fashion-MNIST not found: pass --data or set $RESU_DATA")
    data = datasets.load_fashion_mnist(path)
    return dataclasses.replace(
        data,
        **{k: getattr(data, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")},
    )


def load_kjv(data_dir: str | Path | None, device: torch.device) -> TextData:
    train, val = datasets.load_kjv_bytes(data_dir)
    return TextData(train.to(device), val.to(device))


# --------------------------------------------------------------------------------------------------
# Training batches: a deterministic function of the seed, the same for every method
# --------------------------------------------------------------------------------------------------


def image_batches(data: ImageData, batch_size: int, steps: int, seed: int) -> Iterator[Batch]:
    """``steps`` minibatches, epoch by epoch without replacement (last partial batch dropped)."""
    generator = torch.Generator().manual_seed(seed)
    n = len(data.train_y)
    per_epoch = n // batch_size
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=generator).to(data.train_x.device)
        for b in range(min(per_epoch, steps - done)):
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield data.train_x[idx], data.train_y[idx]
        done += min(per_epoch, steps - done)


def text_batches(data: TextData, batch_size: int, steps: int, seed: int) -> Iterator[Batch]:
    """``steps`` minibatches of ``batch_size`` windows at uniformly random training offsets."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(GPT_CONTEXT + 1, device=data.train.device)
    for _ in range(steps):
        starts = torch.randint(
            len(data.train) - GPT_CONTEXT, (batch_size,), generator=generator
        ).to(data.train.device)
        windows = data.train[starts[:, None] + offsets].long()
        yield windows[:, :-1], windows[:, 1:]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in float32 (logits may come from bf16 autocast)."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


# --------------------------------------------------------------------------------------------------
# Held-out metrics
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def image_accuracy(model: nn.Module, data: ImageData, limit: int | None = None) -> float:
    """Accuracy in percent on the test split (its first ``limit`` images when given)."""
    x, y = data.test_x[:limit], data.test_y[:limit]
    correct = sum(
        int((model(x[i : i + EVAL_BATCH_IMAGES]).argmax(-1) == y[i : i + EVAL_BATCH_IMAGES]).sum())
        for i in range(0, len(y), EVAL_BATCH_IMAGES)
    )
    return 100.0 * correct / len(y)


def validation_windows(data: TextData, limit: int | None = None) -> torch.Tensor:
    """The fixed evaluation set: non-overlapping ``context + 1`` byte windows of the held-out tail."""
    count = (len(data.val) - 1) // GPT_CONTEXT
    starts = torch.arange(count, device=data.val.device)[:limit] * GPT_CONTEXT
    return data.val[starts[:, None] + torch.arange(GPT_CONTEXT + 1, device=data.val.device)].long()


@torch.no_grad()
def validation_perplexity(model: nn.Module, data: TextData, limit: int | None = None) -> float:
    """exp(mean cross-entropy) over every predicted byte of :func:`validation_windows`."""
    windows = validation_windows(data, limit)
    total = torch.zeros((), dtype=torch.float64, device=windows.device)
    for i in range(0, len(windows), EVAL_BATCH_WINDOWS):
        chunk = windows[i : i + EVAL_BATCH_WINDOWS]
        logits = model(chunk[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
    return math.exp(total.item() / windows[:, 1:].numel())


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One benchmark task. ``dataclasses.replace`` makes smaller variants (the CPU test)."""

    name: str
    metric: str
    higher_is_better: bool
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    build: Callable[..., nn.Module]
    load: Callable[[str | Path | None, torch.device], Any]
    batches: Callable[[Any, int, int, int], Iterator[Batch]]
    evaluate: Callable[[nn.Module, Any, int | None], float]
    model_args: Mapping[str, Any] = field(default_factory=dict)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.1

    def model(self) -> nn.Module:
        return self.build(**self.model_args)

    def lr_factor(self, step: int) -> float:
        """LR multiplier: linear warm-up, then cosine decay to ``final_lr_fraction``."""
        warmup = max(1, round(self.warmup_fraction * self.steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.steps - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final_lr_fraction + (1.0 - self.final_lr_fraction) * cosine


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="fmnist-mlp",
            metric="test accuracy (%)",
            higher_is_better=True,
            steps=5000,  # 21 epochs of batch 256
            batch_size=256,
            lr=1e-3,
            weight_decay=0.01,
            build=build_mlp,
            load=load_fashion_mnist,
            batches=image_batches,
            evaluate=image_accuracy,
        ),
        Task(
            name="fmnist-vit",
            metric="test accuracy (%)",
            higher_is_better=True,
            steps=3000,  # 13 epochs of batch 256
            batch_size=256,
            lr=1e-3,
            weight_decay=0.05,
            build=build_vit,
            load=load_fashion_mnist,
            batches=image_batches,
            evaluate=image_accuracy,
        ),
        Task(
            name="kjv-gpt",
            metric="validation perplexity",
            higher_is_better=False,
            steps=1200,  # 9.8M bytes seen, about 2.5 passes over the training text (the H100 run)
            batch_size=32,
            lr=1e-3,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            build=build_gpt,
            load=load_kjv,
            batches=text_batches,
            evaluate=validation_perplexity,
        ),
    )
}
