"""What transitions and steps need for FSDP2-sharded weights: the options they support,
full-weight shapes and draws, the selection that sends shards to the distributed top-k, and
sigma_A over the whole weight (the collectives are :mod:`resu_compile.runtime.distributed`'s).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resu_compile.config import ResuConfig
from resu_compile.kernels.bits import pack_bits, unpack_bits
from resu_compile.kernels.segmented_topk import topk_bits
from resu_compile.method.pruning import global_floors
from resu_compile.method.schedule import keep_count
from resu_compile.method.sharded_topk import sharded_topk_masks
from resu_compile.optim.updates import update_rule
from resu_compile.runtime.distributed import groups_of, sum_over_shards
from resu_compile.shards import local
from resu_compile.state import ManagedWeight

# What the sharded transitions implement (the rest needs whole rows or whole weights).
SHARDED_SUPPORT = {
    "method": ("resu", "oneshot", "gmp", "dense"),
    "criterion": ("magnitude", "random"),
    "distribution": ("uniform", "erk", "global"),
    "selection": ("random", "all"),
    "amnesty_score": ("magnitude", "gradient"),
    "gradient_mask": ("optimizer",),
}


def check_sharded_config(config: ResuConfig) -> None:
    """Refuse, before anything changes, the options FSDP2-sharded weights do not support."""
    for option, supported in SHARDED_SUPPORT.items():
        value = getattr(config, option)
        if value not in supported:
            raise ValueError(
                f"resu.compile: {option}={value!r} is not supported for FSDP2-sharded weights "
                f"(supported: {', '.join(map(repr, supported))})"
            )
    if config.pattern is not None:
        raise ValueError(
            f"resu.compile: pattern={config.pattern!r} is not supported for FSDP2-sharded weights"
        )


def full_shape(weight: ManagedWeight) -> tuple[int, ...]:
    """The shape of the whole weight (all shards)."""
    return tuple(weight.shape) if weight.shard is None else weight.shard.global_shape


def draw(weight: ManagedWeight, kind: str, generator: torch.Generator) -> torch.Tensor:
    """``torch.rand`` / ``torch.randn`` (``kind``) over the weight, on its device, from
    ``generator``; for a shard, the draw of the whole weight's shape (the same on every rank),
    cut to the local rows, so each coordinate gets what a single process gives it. The price is
    one full-shape fp32 temporary per draw, and no communication."""
    sample = torch.rand if kind == "rand" else torch.randn
    values = sample(full_shape(weight), generator=generator, device=generator.device)
    if weight.shard is not None:
        values = weight.shard.local_slice(values).contiguous()
    return values.to(weight.param.device)


def choose_bits(
    weights: Sequence[ManagedWeight],
    scores: Sequence[torch.Tensor],
    ks: Sequence[int],
    eligible: Sequence[tuple[torch.Tensor, bool] | None],
    magnitude: bool = True,
) -> list[torch.Tensor]:
    """:func:`~resu_compile.kernels.segmented_topk.topk_bits` for weights of which some may be
    sharded: ``ks`` count over the whole weight, ``scores`` and ``eligible`` are local, and the
    sharded ones are chosen by the distributed selection (only counts cross ranks)."""
    out: list[torch.Tensor | None] = [None] * len(weights)
    sharded = groups_of(weights)
    taken = {i for _, indices in sharded.values() for i in indices}
    rest = [i for i in range(len(weights)) if i not in taken]
    if rest:
        found = topk_bits(
            [scores[i] for i in rest], [ks[i] for i in rest], [eligible[i] for i in rest], magnitude
        )
        for i, bits in zip(rest, found, strict=True):
            out[i] = bits
    for counts, indices in sharded.values():
        allowed = []
        for i in indices:
            entry = eligible[i]
            if entry is None:
                allowed.append(None)
            else:
                bits = unpack_bits(entry[0], weights[i].shape)
                allowed.append(bits if entry[1] else ~bits)
        masks, _ = sharded_topk_masks(
            [scores[i].abs() if magnitude else scores[i] for i in indices],
            [ks[i] for i in indices],
            allowed,
            counts,
        )
        for i, mask in zip(indices, masks, strict=True):
            out[i] = pack_bits(mask)
    return out  # type: ignore[return-value]


def global_keep_counts(
    weights: Sequence[ManagedWeight],
    scores: Sequence[torch.Tensor],
    eligible: Sequence[torch.Tensor | None],
    sparsity: float,
) -> list[int]:
    """The ``global`` distribution's per-weight counts (one threshold over every layer's scores)
    when the weights are FSDP2 shards: one distributed selection over all local scores at once,
    then one all-reduce of each layer's chosen count; no weight leaves its rank. Each layer's
    floor (:func:`~resu_compile.method.pruning.global_floors`) is chosen first, in one selection
    over the layers apart. Ties at the
    threshold go by rank, then layer, then index (a single process: layer, then index), which
    changes a count only when scores are exactly equal there."""
    groups = groups_of(weights)
    if len(groups) != 1 or any(w.shard is None for w in weights):
        raise ValueError(
            "distribution 'global' on FSDP2-sharded weights needs every managed weight sharded on "
            "one mesh; use distribution='erk' or 'uniform' for this model"
        )
    counts, indices = next(iter(groups.values()))
    target = keep_count(sum(w.total_numel for w in weights), sparsity)
    layers = [scores[i].reshape(-1).float() for i in indices]
    allowed = [
        torch.ones(t.numel(), dtype=torch.bool, device=t.device)
        if eligible[i] is None
        else eligible[i].reshape(-1).to(t.device)
        for t, i in zip(layers, indices, strict=True)
    ]
    floors = global_floors([weights[i].total_numel for i in indices], sparsity)
    kept, taken = sharded_topk_masks(layers, floors, allowed, counts)
    others = torch.cat([a & ~k for a, k in zip(allowed, kept, strict=True)])
    (chosen,), _ = sharded_topk_masks([torch.cat(layers)], [target - sum(taken)], [others], counts)
    local_counts = [0] * len(weights)
    parts = chosen.split([t.numel() for t in layers])
    for i, part in zip(indices, parts, strict=True):
        local_counts[i] = int(part.sum())
    totals = sum_over_shards(weights, local_counts)
    for j, i in enumerate(indices):
        totals[i] += taken[j]
    return [int(total) for total in totals]


def sharded_sigma(weights: Sequence[ManagedWeight], sigma: torch.Tensor) -> torch.Tensor:
    """``sigma`` with each sharded weight's entry replaced by the unbiased std of the active
    coordinates of the whole weight: two all-reduces of (sum, count) and of squared deviations,
    in float64 (equal to a single process's fp32 value up to rounding)."""
    sigma = sigma.clone()
    for counts, indices in groups_of(weights).values():
        device = sigma.device
        values = [local(weights[i].param.detach()).double() for i in indices]
        active = [
            unpack_bits(weights[i].mask_bits_or_all_active(), weights[i].shape) for i in indices
        ]
        first = torch.stack(
            [
                torch.stack([torch.where(a, v, 0.0).sum(), a.sum().double()])
                for v, a in zip(values, active, strict=True)
            ]
        ).to(device)
        first = counts.total(first)
        mean = first[:, 0] / first[:, 1].clamp(min=1)
        squares = torch.stack(
            [
                torch.where(a, (v - mean[j].to(v.device)).square(), 0.0).sum().to(device)
                for j, (v, a) in enumerate(zip(values, active, strict=True))
            ]
        )
        squares = counts.total(squares)
        count = first[:, 1]
        std = (squares / (count - 1).clamp(min=1)).sqrt()
        std = torch.where(count > 1, std, 0.0).to(sigma.dtype)
        for j, i in enumerate(indices):
            sigma[i] = std[j]
    return sigma


def check_sharded_optimizer(
    optimizer: torch.optim.Optimizer, weights: Sequence[ManagedWeight]
) -> None:
    """Sharded weights step only through our masked kernels (SGD, Adam, AdamW): the re-masking
    fallback would mask a DTensor gradient with a local mask."""
    sharded = {id(w.param): w.name for w in weights if w.shard is not None}
    if not sharded:
        return
    for group in optimizer.param_groups:
        if update_rule(optimizer, group) is None:
            names = [sharded[id(p)] for p in group["params"] if id(p) in sharded]
            if names:
                raise ValueError(
                    f"step(): FSDP2-sharded weights ({names[0]!r}) need torch.optim.SGD, Adam or "
                    f"AdamW (not amsgrad, differentiable or capturable); got "
                    f"{type(optimizer).__name__}"
                )


def check_sharded_criterion(weights: list[ManagedWeight], criterion: str) -> None:
    """Refuse, naming the weight, a prune criterion that needs whole rows on a shard (a
    schedule's prune may name one other than the config's, checked at compile time)."""
    supported = SHARDED_SUPPORT["criterion"]
    sharded = [w.name for w in weights if w.shard is not None]
    if criterion not in supported and sharded:
        raise ValueError(
            f"criterion {criterion!r} is not supported for FSDP2-sharded weights "
            f"({sharded[0]!r}); supported: {', '.join(supported)}"
        )
