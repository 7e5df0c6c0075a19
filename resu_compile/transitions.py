"""The mask transitions of METHOD.md, applied in place to every managed weight.

Prune (section 3), RigL's drop / grow, RESU entry and topk re-selection (section 4) and the commit
(section 5). The controller decides *when* a transition runs and keeps the phase bookkeeping;
these functions decide *how*, and return the per-layer numbers its history records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from resu_compile.config import ResuConfig
from resu_compile.kernels.bits import pack_bits, unpack_bits
from resu_compile.method.amnesty import amnesty_mask, amnesty_scores
from resu_compile.method.pruning import keep_top, layer_keep_counts, nm_mask, prune_scores
from resu_compile.method.rigl import rigl_regrow
from resu_compile.method.schedule import keep_count
from resu_compile.method.selective import initial_theta, select_trainable
from resu_compile.state import ManagedWeight

if TYPE_CHECKING:
    from resu_compile.optim.bridge import OptimizerBridge


@dataclass(frozen=True)
class TransitionContext:
    """What every transition needs besides the weights: the options, the optimizer whose state
    follows the masks, the bridge that zeroes it, and the seeded generator of each draw."""

    config: ResuConfig
    optimizer: torch.optim.Optimizer | None
    bridge: OptimizerBridge
    generator: Callable[[ManagedWeight, str], torch.Generator]


@torch.no_grad()
def prune_weights(
    ctx: TransitionContext, weights: list[ManagedWeight], sparsity: float, criterion: str
) -> dict[str, float]:
    """Bring every weight to its share of ``sparsity``; pruned weights and state become 0.

    Returns each layer's actual sparsity. Refuses (changing nothing) a layer an N:M pattern cannot
    split.
    """
    config = ctx.config
    check_pattern(config, weights)
    masks = [w.mask() for w in weights]
    scores = [_prune_scores(ctx, w, criterion) for w in weights]
    if config.distribution == "uniform" or config.nm is not None:
        counts = [keep_count(w.numel, sparsity) for w in weights]
    else:
        counts = layer_keep_counts(
            [w.numel for w in weights],
            sparsity,
            config.distribution,
            shapes=[tuple(w.shape) for w in weights],
            scores=scores,
            eligible=masks,
        )
    layers = {}
    for weight, mask, score, count in zip(weights, masks, scores, counts, strict=True):
        if config.nm is not None:
            new = nm_mask(score, *config.nm, input_dim=weight.input_dim or 1)
            count = active = weight.numel * config.nm[0] // config.nm[1]
        else:
            wanda = criterion == "wanda"  # compared within each output row, as in Wanda
            output_dim = 1 - weight.input_dim if wanda else 0
            new = keep_top(score, count, mask, per_row=wanda, output_dim=output_dim)
            active = min(count, weight.active_count())
        weight.set_mask(new, active)
        weight.keep_target = count
        ctx.bridge.zero_coordinates(ctx.optimizer, weight.param, ~new)
        layers[weight.name] = weight.sparsity()
    return layers


def check_pattern(config: ResuConfig, weights: list[ManagedWeight]) -> None:
    """With an N:M pattern, every managed weight's input dim must split into groups of M."""
    if config.nm is None:
        return
    m = config.nm[1]
    for weight in weights:
        size = weight.shape[weight.input_dim or 1]
        if size % m:
            raise ValueError(
                f"pattern {config.pattern!r}: managed weight {weight.name!r} has "
                f"{size} inputs, not a multiple of {m}; exclude it with exclude=[...]"
            )


def _prune_scores(ctx: TransitionContext, weight: ManagedWeight, criterion: str) -> torch.Tensor:
    return prune_scores(
        weight.param,
        criterion,
        input_norms=input_norms(weight, f"criterion {criterion!r}")
        if criterion == "wanda"
        else None,
        input_dim=weight.input_dim if weight.input_dim is not None else 1,
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
        ctx.bridge.zero_coordinates(ctx.optimizer, weight.param, ~new)
        weight.set_mask(new, active)
        layers[weight.name] = {"dropped": count, "grown": grown, "sparsity": weight.sparsity()}
    if layers:  # one host sync for every layer's count
        grown_counts = torch.stack([entry["grown"].sum() for entry in layers.values()]).tolist()
        for entry, grown_count in zip(layers.values(), grown_counts, strict=True):
            entry["grown"] = grown_count
    return layers


@torch.no_grad()
def enter_resu_weights(ctx: TransitionContext, weights: list[ManagedWeight]) -> dict[str, int]:
    """Choose S in every weight and draw theta on it; ``W[P \\ S] = 0``. Returns ``|S|``."""
    config = ctx.config
    selected = {}
    for weight in weights:
        mask = weight.mask()
        if mask is None:
            mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.param.device)
        pruned = ~mask
        pruned_count = weight.numel - weight.active_count()
        weight.theta_buffers.clear()
        if config.selection == "topk":
            # S is chosen from G at the phase's first step (reselect_by_gradient); until then
            # no coordinate trains.
            weight.param.masked_fill_(pruned, 0)
            weight.select_bits = pack_bits(torch.zeros_like(pruned))
            selected[weight.name] = int(config.alpha * pruned_count)
            continue
        trainable, count = select_trainable(
            pruned, config.selection, config.alpha, ctx.generator(weight, "select"), pruned_count
        )
        theta = initial_theta(
            weight.param, mask, config.theta_init_eps, ctx.generator(weight, "theta")
        )
        weight.param.copy_(torch.where(trainable, theta, weight.param.masked_fill(pruned, 0)))
        weight.select_bits = pack_bits(trainable)
        selected[weight.name] = count
    return selected


@torch.no_grad()
def reselect_by_gradient(
    ctx: TransitionContext, weight: ManagedWeight, gradient: torch.Tensor, draw: str
) -> torch.Tensor:
    """``topk`` selection: S becomes the top ``alpha`` of P by ``|G|``; coordinates that join S get
    a fresh theta draw (named ``draw``), those that leave it go back to 0. Returns the coordinates
    whose theta-optimizer state must restart (joined or left)."""
    config = ctx.config
    mask = weight.mask()
    pruned = ~mask
    new, _ = select_trainable(
        pruned,
        "topk",
        config.alpha,
        ctx.generator(weight, "select"),
        weight.numel - weight.active_count(),
        gradient=gradient,
    )
    old = weight.selection()
    joined, left = new & ~old, old & ~new
    theta = initial_theta(weight.param, mask, config.theta_init_eps, ctx.generator(weight, draw))
    weight.param.copy_(torch.where(joined, theta, weight.param.masked_fill(left, 0)))
    weight.select_bits = pack_bits(new)
    return joined | left


@torch.no_grad()
def commit_weights(
    ctx: TransitionContext, weights: list[ManagedWeight], budget: float, target_sparsity: float
) -> dict[str, dict[str, Any]]:
    """The amnesty tournament (or, without amnesty, the merge) in every weight; returns the
    section-6 numbers of each layer."""
    config = ctx.config
    scores = [_amnesty_scores(config, w) for w in weights] if config.amnesty else None
    layers = {}
    for i, weight in enumerate(weights):
        old = weight.mask()
        if old is None:
            old = torch.ones(weight.shape, dtype=torch.bool, device=weight.param.device)
        n_keep = weight.keep_target
        if n_keep is None:
            n_keep = keep_count(weight.numel, target_sparsity)
        trained = weight.selection()
        reserved = 0
        if scores is None:
            new, active = old | trained, None
        elif config.nm is not None:  # the pattern fixes every group's places: no quota
            new = nm_mask(scores[i], *config.nm, input_dim=weight.input_dim or 1)
            active = n_keep
        else:
            result = amnesty_mask(scores[i], old, n_keep, budget, weight.active_count())
            new, active, reserved = result.mask, min(n_keep, weight.numel), result.n_reserved
        resurrected = new & ~old
        ctx.bridge.zero_coordinates(ctx.optimizer, weight.param, ~new)
        ctx.bridge.resu_phase.restart_state(
            ctx.optimizer, weight, resurrected, config.carry_theta_state
        )
        revived = (
            unpack_bits(weight.revived_bits, weight.shape).to(new.device)
            if weight.revived_bits is not None
            else torch.zeros_like(new)
        )
        counts = [(~old).sum(), resurrected.sum(), (new ^ old).sum(), (revived & new).sum()]
        counts.append((resurrected & trained).sum() if trained is not None else counts[1] * 0)
        old_pruned, count, churn, survivors, trained_count = torch.stack(counts).tolist()
        weight.set_mask(new, active)
        weight.revived_bits = pack_bits(revived | resurrected).cpu()
        weight.select_bits = None
        weight.theta_buffers.clear()
        layers[weight.name] = {
            "target": target_sparsity,
            "sparsity": weight.sparsity(),
            "resurrected": count,
            # Winners that trained as theta; the rest of the n_R places went to untrained zeros.
            "resurrected_trained": trained_count,
            "resurrection_rate": count / old_pruned if old_pruned else 0.0,
            "churn": churn,
            # Weights resurrected at earlier commits that are still active after this one.
            "survivors": survivors,
            "reserved": reserved,
            "pruned_before": old_pruned,
            "budget": budget,
        }
    return layers


def _amnesty_scores(config: ResuConfig, weight: ManagedWeight) -> torch.Tensor:
    score = config.amnesty_score
    gradient = weight.param.grad
    if score == "gradient" and gradient is None:
        raise RuntimeError(
            f"commit: amnesty_score 'gradient' needs G of {weight.name!r} from the last RESU "
            "step: call commit() after backward() and before zero_grad()"
        )
    return amnesty_scores(
        weight.param,
        score,
        gradient=gradient,
        input_norms=input_norms(weight, "amnesty_score 'wanda'") if score == "wanda" else None,
        input_dim=weight.input_dim if weight.input_dim is not None else 1,
    )
