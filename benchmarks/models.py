"""Transformer models the benchmarks train: a GPT-2-style decoder and a ViT encoder.

Every projection is an ``nn.Linear`` (the ViT's patch embedding too), so these are the models
whose linears RESU manages. The decoder ties its lm_head to the token embedding, which the pass
skips (the weight is also an embedding table).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TransformerSize:
    layers: int
    width: int
    heads: int


GPT2_SMALL = TransformerSize(layers=12, width=768, heads=12)
VIT_BASE = TransformerSize(layers=12, width=768, heads=12)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention (fused qkv) and a 4x MLP."""

    def __init__(self, width: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Byte- or token-level GPT: learned positions, causal blocks, lm_head tied to the embedding."""

    def __init__(self, size: TransformerSize, vocab: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, size.width)
        self.pos = nn.Embedding(context, size.width)
        self.blocks = nn.ModuleList(
            Block(size.width, size.heads, causal=True) for _ in range(size.layers)
        )
        self.ln = nn.LayerNorm(size.width)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln(x), self.tok.weight)


class ViT(nn.Module):
    """Vision transformer: linear patch embedding, class token, encoder blocks, linear head."""

    def __init__(
        self, size: TransformerSize, image: int, patch: int, channels: int, classes: int
    ) -> None:
        super().__init__()
        self.patch = patch
        patches = (image // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, size.width)
        self.cls = nn.Parameter(torch.zeros(1, 1, size.width))
        self.pos = nn.Parameter(torch.randn(1, patches + 1, size.width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(size.width, size.heads, causal=False) for _ in range(size.layers)
        )
        self.ln = nn.LayerNorm(size.width)
        self.head = nn.Linear(size.width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        p = self.patch
        patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = self.embed(patches.reshape(b, (h // p) * (w // p), c * p * p))
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x[:, 0]))
