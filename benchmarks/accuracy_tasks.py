"""The tasks of the accuracy benchmark: model, data, training batches and held-out metric.

A :class:`Task` fixes everything a method must not change: the architecture, the data, the batch
order (from the seed), the optimizer step budget, the AdamW hyper-parameters and the evaluation.

* ``fmnist-mlp``: MLP 784-1024-1024-10 on Fashion-MNIST, test accuracy (10,000 images).
* ``fmnist-vit``: ViT (linear 4x4 patch embedding, width 192, 6 blocks, 3 heads) on Fashion-MNIST,
  test accuracy.
* ``kjv-gpt``: byte-level GPT (6 layers, width 384, 6 heads, context 256) on the King James Bible,
  validation perplexity on non-overlapping windows of the held-out tail.
* ``sotu-llama``: a Llama-style decoder (``transformers.LlamaForCausalLM`` from a config: RMSNorm,
  SwiGLU, rotary positions, untied output head; 6 layers, hidden 384, intermediate 1024, 6 heads,
  context 256) on the State of the Union addresses, bytes as tokens; validation bits per byte on
  the last 10% of the addresses (chronological split).
* ``kjv-gpt-recover``: "prune a trained model and recover": ``kjv-gpt``'s model trained dense for
  ``pretrain_steps`` once per seed, then every method starts from that checkpoint with the same
  recovery budget of ``steps``.
* ``fmnist-cnn``: a small CNN (four 3x3 convolutions with batch norm, global average pooling and a
  linear head) on Fashion-MNIST, test accuracy. Its convolutions are managed only by a build of
  ``resu_compile`` that manages convolution weights; otherwise only the head is.

Training sees only the training split; the metric reads only the held-out split.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import math
import os
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
SOTU_FILE = "sotu.txt.gz"
SOTU_HEADER = b"=== "  # each address follows a line "=== YEAR_NAME_PARTY"
SOTU_VALIDATION_FRACTION = 0.1


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


class LlamaLM(nn.Module):
    """``transformers.LlamaForCausalLM`` returning its logits, like the other task models."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.lm = LlamaForCausalLM(config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=idx, use_cache=False).logits


def build_llama(
    layers: int = 6, hidden: int = 384, intermediate: int = 1024, heads: int = 6
) -> nn.Module:
    """Byte-level Llama (vocabulary 256, context 256, untied output head) from a config.

    transformers is imported here, so the tasks that do not use it do not need it.
    """
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=GPT_CONTEXT,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return LlamaLM(config)


class FlatImageCNN(nn.Module):
    """3x3 conv + batch norm + ReLU blocks (stride 2 where the width doubles), global average
    pooling and a linear head, fed with flattened single-channel square images."""

    def __init__(self, channels: tuple[int, ...], classes: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise((1, *channels)):
            stride = 2 if fan_out > fan_in > 1 else 1
            blocks += [
                nn.Conv2d(fan_in, fan_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(fan_out),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(channels[-1], classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(images.shape[-1])
        features = self.features(images.view(-1, 1, side, side))
        return self.head(features.mean(dim=(2, 3)))


def build_cnn(channels: tuple[int, ...] = (32, 64, 128, 128), classes: int = 10) -> nn.Module:
    return FlatImageCNN(channels, classes)


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


def find_sotu(data_dir: str | Path | None) -> Path:
    """``sotu.txt.gz`` in ``data_dir`` or its ``sotu/`` (default: ``$RESU_DATA``'s ``sotu/``)."""
    root = (
        Path(data_dir) if data_dir is not None else Path(os.environ.get(datasets.DATA_ENV_VAR, "."))
    )
    candidates = (root / SOTU_FILE, root / "sotu" / SOTU_FILE, root.parent / "sotu" / SOTU_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{SOTU_FILE} not found in {root}, {root / 'sotu'} nor {root.parent / 'sotu'}: "
        "pass --data (the folder holding sotu/) or set $RESU_DATA"
    )


def split_addresses(text: bytes) -> list[bytes]:
    """The addresses of the SOTU file, in file (chronological) order, without their header lines."""
    addresses = []
    for chunk in text.split(b"\n" + SOTU_HEADER):
        if chunk.startswith(SOTU_HEADER):  # the first address: the file starts with its header
            chunk = chunk[len(SOTU_HEADER) :]
        _header, _, body = chunk.partition(b"\n")
        if body.strip():
            addresses.append(body.strip() + b"\n")
    return addresses


def sotu_split(
    text: bytes, validation_fraction: float = SOTU_VALIDATION_FRACTION
) -> tuple[bytes, bytes]:
    """(training bytes, validation bytes): the last ``validation_fraction`` of the addresses (at
    least one) are held out, so validation is later in time than anything trained on."""
    addresses = split_addresses(text)
    held_out = max(1, round(validation_fraction * len(addresses)))
    if held_out >= len(addresses):
        raise ValueError(f"{len(addresses)} addresses are too few to hold out {held_out}")
    return b"".join(addresses[:-held_out]), b"".join(addresses[-held_out:])


def load_sotu(data_dir: str | Path | None, device: torch.device) -> TextData:
    train, val = sotu_split(gzip.decompress(find_sotu(data_dir).read_bytes()))
    return TextData(
        *(torch.frombuffer(bytearray(b), dtype=torch.uint8).to(device) for b in (train, val))
    )


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
    """The fixed evaluation set: non-overlapping ``context + 1`` byte windows of the held-out tail
    (``limit`` of them spread evenly over it when given)."""
    count = (len(data.val) - 1) // GPT_CONTEXT
    index = torch.arange(count, device=data.val.device)
    if limit is not None and limit < count:
        index = torch.linspace(0, count - 1, limit, device=data.val.device).long()
    starts = index * GPT_CONTEXT
    return data.val[starts[:, None] + torch.arange(GPT_CONTEXT + 1, device=data.val.device)].long()


@torch.no_grad()
def validation_nats(model: nn.Module, data: TextData, limit: int | None = None) -> float:
    """Mean cross-entropy (nats) over every predicted byte of :func:`validation_windows`."""
    windows = validation_windows(data, limit)
    total = torch.zeros((), dtype=torch.float64, device=windows.device)
    for i in range(0, len(windows), EVAL_BATCH_WINDOWS):
        chunk = windows[i : i + EVAL_BATCH_WINDOWS]
        logits = model(chunk[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
    return total.item() / windows[:, 1:].numel()


def validation_perplexity(model: nn.Module, data: TextData, limit: int | None = None) -> float:
    """exp(:func:`validation_nats`)."""
    return math.exp(validation_nats(model, data, limit))


def validation_bits_per_byte(model: nn.Module, data: TextData, limit: int | None = None) -> float:
    """:func:`validation_nats` in bits (tokens are bytes, so bits per byte)."""
    return validation_nats(model, data, limit) / math.log(2)


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
    #: > 0: a recovery task. Dense training of this many steps (once per seed) gives the
    #: checkpoint every method starts from; ``steps`` is then the recovery budget.
    pretrain_steps: int = 0
    #: Held-out images / windows the validation trace evaluates (the final metric reads them all).
    trace_limit: int = 2000
    #: Milliseconds per optimizer step of one run while about 12 runs share one H100 / H200 (the
    #: planning estimate when no earlier result of the task says better).
    step_ms: float = 50.0

    def model(self) -> nn.Module:
        return self.build(**self.model_args)

    def pretraining(self) -> Task:
        """The dense training that gives a recovery task its checkpoint (same data, optimizer
        and learning-rate shape, over ``pretrain_steps``)."""
        return dataclasses.replace(
            self, name=f"{self.name}-pretrain", steps=self.pretrain_steps, pretrain_steps=0
        )

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
            step_ms=2.7,
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
            step_ms=38.0,
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
            trace_limit=128,
            step_ms=55.0,
        ),
        Task(
            name="sotu-llama",
            metric="validation bits per byte",
            higher_is_better=False,
            steps=2000,  # 16.4M bytes seen, about 1.7 passes over the training addresses
            batch_size=32,
            lr=1e-3,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            build=build_llama,
            load=load_sotu,
            batches=text_batches,
            evaluate=validation_bits_per_byte,
            trace_limit=128,
            step_ms=70.0,
        ),
        Task(
            name="kjv-gpt-recover",
            metric="validation perplexity",
            higher_is_better=False,
            steps=600,
            pretrain_steps=1200,  # kjv-gpt's whole budget: its dense run is the checkpoint
            batch_size=32,
            lr=1e-3,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            build=build_gpt,
            load=load_kjv,
            batches=text_batches,
            evaluate=validation_perplexity,
            trace_limit=128,
            step_ms=55.0,
        ),
        Task(
            name="fmnist-cnn",
            metric="test accuracy (%)",
            higher_is_better=True,
            steps=3000,  # 13 epochs of batch 256
            batch_size=256,
            lr=1e-3,
            weight_decay=0.01,
            build=build_cnn,
            load=load_fashion_mnist,
            batches=image_batches,
            evaluate=image_accuracy,
            step_ms=5.0,
        ),
    )
}
