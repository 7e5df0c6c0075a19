"""The mask transitions of METHOD.md, applied in place to every managed weight.

Prune (section 3), RigL's drop / grow, RESU entry (section 4) and the commit (section 5). The controller decides *when* a transition runs and keeps the phase bookkeeping;
these functions decide *how*, and return the per-layer numbers its history records.

Weights sharded by FSDP2 follow the same rules on their local shards: counts are over the whole
weight, selections go through the distributed top-k and draws are cut from full-shape draws
(:mod:`resu_compile.runtime.distributed`), so the masks are a single process's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from resu_compile.config import ResuConfig
from resu_compile.kernels.bits import count_bits, pack_bits, packed_numel
from resu_compile.kernels.commit_bits import commit_bits
from resu_compile.kernels.masked_zero import zero_where_clear_
from resu_compile.kernels.theta_entry import active_sigma, write_theta_
from resu_compile.method.amnesty import (
    AmnestyQuotas,
    amnesty_quotas,
    amnesty_scores,
    untrained_scores,
)
from resu_compile.method.pruning import keep_top, layer_keep_counts, pattern_mask, prune_scores
from resu_compile.method.rigl import rigl_regrow
from resu_compile.method.schedule import keep_count
from resu_compile.optim.slots import (
    restart_resurrected_state,
    zero_coordinates,
    zero_where_pruned,
)
from resu_compile.runtime.distributed import sum_over_shards, sum_rows_over_shards
from resu_compile.runtime.sharded import (
    check_sharded_criterion,
    choose_bits,
    draw,
    full_shape,
    global_keep_counts,
    sharded_sigma,
)
from resu_compile.shards import local
from resu_compile.state import ManagedWeight


@dataclass(frozen=True)
class TransitionContext:
    """What every transition needs besides the weights: the options, the optimizer whose state
    follows the masks, and the seeded generator of each draw."""

    config: ResuConfig
    optimizer: torch.optim.Optimizer | None
    generator: Callable[[ManagedWeight, str], torch.Generator]


@torch.no_grad()
def prune_weights(
    ctx: TransitionContext, weights: list[ManagedWeight], sparsity: float, criterion: str
) -> dict[str, float]:
    """Bring every weight to its share of ``sparsity``; pruned weights and state become 0.

    Returns each layer's actual sparsity. Refuses (changing nothing) a layer an N:M pattern cannot
    split. Whole-layer top-k masks (magnitude and random criteria) are found for every weight at
    once by :func:`~resu_compile.kernels.segmented_topk.topk_bits`; N:M and Wanda's row-wise
    comparison go weight by weight.
    """
    config = ctx.config
    check_pattern(config, weights)
    check_sharded_criterion(weights, criterion)
    scores = None
    if config.distribution == "uniform" or config.nm is not None:
        counts = [keep_count(w.total_numel, sparsity) for w in weights]
    elif config.distribution == "global" and any(w.shard is not None for w in weights):
        scores = [_prune_scores(ctx, w, criterion) for w in weights]
        counts = global_keep_counts(weights, scores, [w.mask() for w in weights], sparsity)
    else:
        scores = [_prune_scores(ctx, w, criterion) for w in weights]
        counts = layer_keep_counts(
            [w.total_numel for w in weights],
            sparsity,
            config.distribution,
            shapes=[full_shape(w) for w in weights],
            scores=scores,
            eligible=[w.mask() for w in weights],
        )
    if config.nm is not None or criterion == "wanda":
        if scores is None:
            scores = [_prune_scores(ctx, w, criterion) for w in weights]
        new_bits = [
            pack_bits(_pattern_or_row_mask(config, w, s, count, criterion))
            for w, s, count in zip(weights, scores, counts, strict=True)
        ]
    else:
        if scores is None:  # magnitude reads the weights themselves
            scores = [
                local(w.param.detach())
                if criterion == "magnitude"
                else _prune_scores(ctx, w, criterion)
                for w in weights
            ]
        eligible = [None if w.mask_bits is None else (w.mask_bits, True) for w in weights]
        new_bits = choose_bits(weights, scores, counts, eligible, magnitude=True)
    for weight, bits, count in zip(weights, new_bits, counts, strict=True):
        if config.nm is not None:
            count = active = weight.numel * config.nm[0] // config.nm[1]
        elif weight.shard is not None:
            active = count_bits(bits)
        else:
            active = min(count, weight.active_count())
        weight.set_mask_bits(bits, active)
        weight.keep_target = count
    zero_where_pruned(ctx.optimizer, weights)
    return dict(zip([w.name for w in weights], total_sparsities(weights), strict=True))


def total_sparsities(weights: list[ManagedWeight]) -> list[float]:
    """Each weight's sparsity over the whole weight (all shards: one all-reduce of the counts)."""
    actives = sum_over_shards(weights, [w.active_count() for w in weights])
    return [1.0 - a / w.total_numel for w, a in zip(weights, actives, strict=True)]


def _pattern_or_row_mask(
    config: ResuConfig, weight: ManagedWeight, scores: torch.Tensor, count: int, criterion: str
) -> torch.Tensor:
    """The N:M mask, or Wanda's (top-k compared within each output row)."""
    if config.nm is not None:
        return _pattern_mask(config, weight, scores)
    return keep_top(scores, count, weight.mask(), per_row=True, output_dim=1 - weight.input_dim)


def _pattern_mask(config: ResuConfig, weight: ManagedWeight, scores: torch.Tensor) -> torch.Tensor:
    n, m = config.nm  # type: ignore[misc]
    return pattern_mask(
        scores, n, m, input_dim=weight.reduction_dim, transposable=config.transposable
    )


def check_pattern(config: ResuConfig, weights: list[ManagedWeight]) -> None:
    """With an N:M pattern, every managed weight's input dim must split into groups of M (and,
    for a transposable pattern, a 2-D weight's output dim too)."""
    if config.nm is None:
        return
    m = config.nm[1]
    for weight in weights:
        size = weight.shape[weight.reduction_dim]
        if size % m:
            raise ValueError(
                f"pattern {config.pattern!r}: managed weight {weight.name!r} has "
                f"{size} inputs, not a multiple of {m}; exclude it with exclude=[...]"
            )
        if (
            config.transposable
            and len(weight.shape) == 2
            and weight.shape[1 - weight.reduction_dim] % m
        ):
            raise ValueError(
                f"transposable=True: managed weight {weight.name!r} has "
                f"{weight.shape[1 - weight.reduction_dim]} outputs, not a multiple of {m}; "
                "exclude it with exclude=[...]"
            )


def _prune_scores(ctx: TransitionContext, weight: ManagedWeight, criterion: str) -> torch.Tensor:
    if weight.shard is not None:  # check_sharded_criterion let only these two through
        if criterion == "random":
            return draw(weight, "rand", ctx.generator(weight, "prune"))
        return local(weight.param.detach()).abs()
    return prune_scores(
        weight.param,
        criterion,
        input_norms=input_norms(weight, f"criterion {criterion!r}")
        if criterion == "wanda"
        else None,
        input_dim=weight.reduction_dim,
        generator=ctx.generator(weight, "prune"),
    )


def input_norms(weight: ManagedWeight, purpose: str) -> torch.Tensor:
    """``||X_j||_2`` per input feature, from calibrate passes (a clear error if none ran)."""
    if weight.input_sq_norms is None or weight.input_dim is None:
        raise RuntimeError(
            f"{purpose}: no calibrate pass has recorded the input norms of {weight.name!r}; run "
            "forward passes inside `with model.resu.calibrate():` before each prune and commit"
        )
    return weight.input_sq_norms.sqrt()


@torch.no_grad()
def regrow_weights(
    ctx: TransitionContext, weights: list[ManagedWeight], fraction: float
) -> dict[str, dict[str, Any]]:
    """RigL: drop the smallest ``|W|``, grow the largest ``|G|`` (``fraction`` of the actives);
    grown weights start at 0 with zero optimizer state (they were pruned, so both already are)."""
    layers: dict[str, dict[str, Any]] = {}
    for weight in weights:
        if weight.param.grad is None or weight.mask_bits is None:
            continue  # unused by this step's forward: nothing to grow from
        active = weight.active_count()
        count = int(fraction * active)
        new, grown = rigl_regrow(weight.param, weight.param.grad, weight.mask(), count, active)
        zero_coordinates(ctx.optimizer, weight.param, ~new)
        weight.set_mask(new, active)
        layers[weight.name] = {"dropped": count, "grown": grown, "sparsity": weight.sparsity()}
    if layers:  # one host sync for every layer's count
        grown_counts = torch.stack([entry["grown"].sum() for entry in layers.values()]).tolist()
        for entry, grown_count in zip(layers.values(), grown_counts, strict=True):
            entry["grown"] = grown_count
    return layers


@torch.no_grad()
def enter_resu_weights(ctx: TransitionContext, weights: list[ManagedWeight]) -> dict[str, int]:
    """Choose S in every weight and draw theta on it; ``W[P \\ S] = 0``. Returns ``|S|``.

    Every weight at once: S by :func:`topk_bits` (``random``: the top-k of uniform noise over P,
    drawn once per weight from its own generator; ``all`` / ``consistency``: all of P), sigma_A and
    theta by :mod:`resu_compile.kernels.theta_entry`.
    """
    if not weights:
        return {}
    config = ctx.config
    for weight in weights:
        weight.theta_buffers.clear()
    params = [local(w.param.data) for w in weights]
    mask_bits = [w.mask_bits_or_all_active() for w in weights]
    actives = sum_over_shards(weights, [w.active_count() for w in weights])
    pruned_counts = [w.total_numel - int(a) for w, a in zip(weights, actives, strict=True)]
    pruned = [(bits, False) for bits in mask_bits]
    if config.selection == "topk":
        # S is chosen from G at the phase's first step (the theta step does it); until then no
        # coordinate trains.
        select_bits = [torch.zeros_like(bits) for bits in mask_bits]
        counts = [int(config.alpha * n) for n in pruned_counts]
        zero_where_clear_(params, mask_bits)
    else:
        if config.selection == "random":
            scores = [draw(w, "rand", ctx.generator(w, "select")) for w in weights]
            counts = [int(config.alpha * n) for n in pruned_counts]
        else:  # all of P: any scores, k = |P|
            scores, counts = params, pruned_counts
        select_bits = choose_bits(weights, scores, counts, pruned, magnitude=True)
        sigma = active_sigma(params, mask_bits, [w.active_count() for w in weights])
        sigma = sharded_sigma(weights, sigma)
        noise = [draw(w, "randn", ctx.generator(w, "theta")) for w in weights]
        write_theta_(params, mask_bits, select_bits, noise, config.theta_init_eps * sigma)
    selected = {}
    for weight, bits, count in zip(weights, select_bits, counts, strict=True):
        if config.selection == "topk":
            weight.set_selection(bits, 0)
        else:
            weight.set_selection(bits, count if weight.shard is None else count_bits(bits))
        selected[weight.name] = count
    return selected


@torch.no_grad()
def commit_weights(
    ctx: TransitionContext, weights: list[ManagedWeight], budget: float, target_sparsity: float
) -> dict[str, dict[str, Any]]:
    """The amnesty tournament (or, without amnesty, the merge) in every weight; returns the
    section-6 numbers of each layer.

    The tournaments of all weights run as two (three with a shortfall) :func:`topk_bits` calls,
    and the bookkeeping (resurrected set, state to restart, survival counts) as one
    :func:`commit_bits` pass; the counts reach the host in one transfer.
    """
    if not weights:
        return {}
    config = ctx.config
    old_bits = [w.mask_bits_or_all_active() for w in weights]
    local_actives = [w.active_count() for w in weights]
    # Quotas and reported numbers count over whole weights (a shard's local counts, summed).
    active_counts = [int(a) for a in sum_over_shards(weights, local_actives)]
    selected_counts = sum_over_shards(weights, [w.selected_count() for w in weights])
    n_keeps = [
        w.keep_target if w.keep_target is not None else keep_count(w.total_numel, target_sparsity)
        for w in weights
    ]
    trained_bits = [
        w.select_bits if w.select_bits is not None else torch.zeros_like(bits)
        for w, bits in zip(weights, old_bits, strict=True)
    ]
    quotas = [
        amnesty_quotas(w.total_numel, active, int(selected), n_keep, budget)
        for w, active, selected, n_keep in zip(
            weights, active_counts, selected_counts, n_keeps, strict=True
        )
    ]
    new_bits, actives = _winners(config, weights, old_bits, trained_bits, quotas, n_keeps)
    revived = _revived_on_device(weights, old_bits)
    outcome = commit_bits(old_bits, new_bits, trained_bits, revived, [w.numel for w in weights])
    carry_state = config.carry_theta_state or any(w.theta_buffers for w in weights)
    for weight, bits, active in zip(weights, new_bits, actives, strict=True):
        weight.set_mask_bits(bits, active if weight.shard is None else None)
    # Newly pruned coordinates lose weight and state; resurrected ones restart their state.
    zero_where_pruned(
        ctx.optimizer, weights, state_bits=None if carry_state else outcome.keep_state
    )
    if carry_state:
        for weight, old in zip(weights, old_bits, strict=True):
            restart_resurrected_state(
                ctx.optimizer,
                weight,
                old,
                carry=config.carry_theta_state,
                rule=config.theta_optimizer,
                selection=config.selection,
            )
    local_counts = outcome.counts.tolist()  # the one host sync of the commit
    counts = sum_rows_over_shards(weights, local_counts)
    _store_revived(weights, outcome.revived)
    if not config.amnesty:  # the merge: every resurrected weight joins the old actives
        for weight, active, row in zip(weights, local_actives, local_counts, strict=True):
            weight.set_mask_bits(weight.mask_bits, active + row[0])
    for weight in weights:
        weight.set_selection(None)
        weight.theta_buffers.clear()
    reserved = [q.n_reserved if config.amnesty and config.nm is None else 0 for q in quotas]
    return {
        weight.name: _commit_numbers(weight, active, row, sparsity, held, target_sparsity, budget)
        for weight, active, row, sparsity, held in zip(
            weights, active_counts, counts, total_sparsities(weights), reserved, strict=True
        )
    }


def _commit_numbers(
    weight: ManagedWeight,
    active_before: int,
    row: list[int],
    sparsity: float,
    reserved: int,
    target_sparsity: float,
    budget: float,
) -> dict[str, Any]:
    """One layer's section-6 numbers of a commit; ``row`` holds its counts from
    :func:`commit_bits` (resurrected, churn, survivors, resurrected that trained)."""
    count, churn, survivors, trained_count = (int(c) for c in row)
    old_pruned = weight.total_numel - active_before
    return {
        "target": target_sparsity,
        "sparsity": sparsity,
        "resurrected": count,
        # Winners that trained as theta (all of them, unless a densifying commit needed more).
        "resurrected_trained": trained_count,
        "resurrection_rate": count / old_pruned if old_pruned else 0.0,
        "churn": churn,
        # Weights resurrected at earlier commits that are still active after this one.
        "survivors": survivors,
        "reserved": reserved,
        "pruned_before": old_pruned,
        "budget": budget,
    }


def _winners(
    config: ResuConfig,
    weights: list[ManagedWeight],
    old_bits: list[torch.Tensor],
    trained_bits: list[torch.Tensor],
    quotas: list[AmnestyQuotas],
    n_keeps: list[int],
) -> tuple[list[torch.Tensor], list[int | None]]:
    """Every layer's new mask as packed bits, and its active count where known without a
    count: the merge (``amnesty=False``), the N:M pattern's groups, or the tournament."""
    if not config.amnesty:
        return [old | trained for old, trained in zip(old_bits, trained_bits, strict=True)], [
            None
        ] * len(weights)
    if config.nm is not None:  # the pattern fixes every group's places: no quota
        bits = [pack_bits(_pattern_mask(config, w, _amnesty_scores(config, w))) for w in weights]
        return bits, list(n_keeps)
    bits = _tournaments(config, weights, old_bits, trained_bits, quotas)
    return bits, [min(n_keep, w.numel) for w, n_keep in zip(weights, n_keeps, strict=True)]


def _tournaments(
    config: ResuConfig,
    weights: list[ManagedWeight],
    old_bits: list[torch.Tensor],
    trained_bits: list[torch.Tensor],
    quotas: list[AmnestyQuotas],
) -> list[torch.Tensor]:
    """Every layer's amnesty winners as packed bits (:func:`~resu_compile.method.amnesty.
    amnesty_mask` is the one-layer rule): A and the trained candidates T compete apart for their
    places, then any shortfall is filled from the rest of A, then from the rest of T, then from
    the untrained pruned coordinates by ``|G|`` (ties: lower index)."""
    scores = [
        local(w.param.data) if config.amnesty_score == "magnitude" else _amnesty_scores(config, w)
        for w in weights
    ]
    n = len(weights)
    groups = choose_bits(
        weights + weights,
        scores + scores,
        [q.from_active for q in quotas] + [q.from_trained for q in quotas],
        [(bits, True) for bits in old_bits] + [(bits, True) for bits in trained_bits],
        magnitude=True,
    )
    winners = [groups[i] | groups[n + i] for i in range(n)]
    # Each shortfall group: its quota, the eligible coordinates of layer i, and its scores.
    shortfalls = (
        ("extra_active", lambda i: (old_bits[i] & ~winners[i], True), lambda i: scores[i]),
        ("extra_trained", lambda i: (trained_bits[i] & ~winners[i], True), lambda i: scores[i]),
        (
            "untrained",
            lambda i: (old_bits[i] | trained_bits[i], False),
            lambda i: untrained_scores(_local_grad(weights[i]), scores[i]),
        ),
    )
    for quota, eligible, ranking in shortfalls:
        short = [i for i, q in enumerate(quotas) if getattr(q, quota) > 0]
        if not short:
            continue
        found = choose_bits(
            [weights[i] for i in short],
            [ranking(i) for i in short],
            [getattr(quotas[i], quota) for i in short],
            [eligible(i) for i in short],
            magnitude=True,
        )
        for i, bits in zip(short, found, strict=True):
            winners[i] = winners[i] | bits
    return winners


def _revived_on_device(
    weights: list[ManagedWeight], old_bits: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Each weight's ever-resurrected bits (kept in host memory) on the mask's device.

    After a commit they are consecutive slices of one page-locked buffer (:func:`_store_revived`),
    which crosses in one DMA. Nothing is concatenated on the host: ATen spreads a large host ``cat``
    over its thread pool, and on a busy host one descheduled pool thread stalled a commit by
    200 ms. Bits from elsewhere (a checkpoint) cross one weight at a time; absent ones start at 0.
    """
    if not weights:
        return []
    device = old_bits[0].device
    sizes = [bits.numel() for bits in old_bits]
    host = [w.revived_bits for w in weights]
    flat = _one_buffer(host, sizes)
    if flat is not None:
        on_device = flat.to(device, non_blocking=True)
    else:
        on_device = torch.cat(
            [
                torch.zeros(n, dtype=torch.uint8, device=device)
                if bits is None
                else bits.to(device, non_blocking=True)
                for bits, n in zip(host, sizes, strict=True)
            ]
        )
    # A model spread over several devices: each weight's bits go where its mask lives.
    parts = torch.split(on_device, sizes)
    return [part.to(bits.device) for part, bits in zip(parts, old_bits, strict=True)]


def _one_buffer(host: list[torch.Tensor | None], sizes: list[int]) -> torch.Tensor | None:
    """The flat tensor whose consecutive slices ``host`` are, from its start, or None."""
    if any(bits is None for bits in host):
        return None
    first = host[0]
    storage = first.untyped_storage()  # type: ignore[union-attr]
    offset = 0
    for bits, size in zip(host, sizes, strict=True):
        if (
            bits.untyped_storage().data_ptr() != storage.data_ptr()  # type: ignore[union-attr]
            or bits.storage_offset() != offset  # type: ignore[union-attr]
            or bits.numel() != size  # type: ignore[union-attr]
        ):
            return None
        offset += size
    return first.new_empty(0).set_(storage, 0, (offset,), (1,))  # type: ignore[union-attr]


def _store_revived(weights: list[ManagedWeight], revived: list[torch.Tensor]) -> None:
    """Back to host memory in one device-to-host copy (telemetry costs no device memory)."""
    if not weights:
        return
    device = revived[0].device
    on_device = torch.cat([bits.to(device) for bits in revived])
    flat = _host_buffer(on_device.numel(), device).copy_(on_device)
    for weight, bits in zip(weights, torch.split(flat, [t.numel() for t in revived]), strict=True):
        weight.revived_bits = bits


def reserve_host_buffers(weights: list[ManagedWeight]) -> None:
    """Take the page-locked memory of the commits' revived bits ahead, into torch's caching host
    allocator: a first ``cudaHostAlloc`` costs milliseconds, and since a commit fills a new
    buffer while the weights still hold the last one, two buffers take turns."""
    if not weights or not weights[0].param.is_cuda:
        return
    numel = sum(packed_numel(w.numel) for w in weights)
    buffers = [_host_buffer(numel, weights[0].param.device) for _ in range(2)]
    del buffers  # back to the allocator's cache, where the commits find them


def _host_buffer(numel: int, device: torch.device) -> torch.Tensor:
    """``numel`` bytes of host memory for copies to and from ``device``: page-locked for a CUDA
    device (from torch's caching host allocator, so a commit reuses the last one's)."""
    return torch.empty(numel, dtype=torch.uint8, pin_memory=device.type == "cuda")


def _amnesty_scores(config: ResuConfig, weight: ManagedWeight) -> torch.Tensor:
    score = config.amnesty_score
    gradient = _local_grad(weight)
    if score == "gradient" and gradient is None:
        raise RuntimeError(
            f"commit: amnesty_score 'gradient' needs G of {weight.name!r} from the last RESU "
            "step: call commit() after backward() and before zero_grad()"
        )
    return amnesty_scores(
        local(weight.param),
        score,
        gradient=gradient,
        input_norms=input_norms(weight, "amnesty_score 'wanda'") if score == "wanda" else None,
        input_dim=weight.reduction_dim,
    )


def _local_grad(weight: ManagedWeight) -> torch.Tensor | None:
    grad = weight.param.grad
    return None if grad is None else local(grad)
