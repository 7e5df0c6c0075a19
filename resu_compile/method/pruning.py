"""Pruning (METHOD.md section 3): which coordinates stay active at a cycle's target sparsity.

Pure tensor rules, no FX and no controller:

- :func:`prune_scores`: the criterion (magnitude, Wanda, random); higher survives.
- :func:`prune_mask`: the new mask of one layer, over the whole layer or row by row (Wanda).
- :func:`layer_keep_counts`: how many coordinates each layer keeps (uniform, global, ERK).
- :func:`nm_mask`: the N:M pattern (top ``n`` of every ``m`` consecutive inputs of a row).
- :func:`transposable_nm_mask`: the N:M pattern in both directions (every ``m x m`` block keeps
  ``n`` of each row and of each column), so the transposed weight is N:M too.

Every tie is broken by the lower index (flat index within a layer, then layer order).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch

from resu_compile.method.schedule import keep_count
from resu_compile.method.topk import topk_mask

CRITERIA = ("magnitude", "wanda", "random")
DISTRIBUTIONS = ("uniform", "global", "erk")


def prune_scores(
    weight: torch.Tensor,
    criterion: str,
    *,
    input_norms: torch.Tensor | None = None,
    input_dim: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Score of every coordinate of ``weight``; higher survives.

    - ``magnitude``: ``|W|``.
    - ``wanda``: ``|W_ij| * ||X_j||_2`` with ``input_norms`` the 1-D vector of input-feature norms
      and ``input_dim`` the input dim of ``weight`` (1 for ``nn.Linear`` (out, in), 0 for GPT-2
      ``Conv1D`` (in, out), 1 for a convolution kernel (out, in, *kernel), whose ``||X_j||`` is
      the norm of input channel ``j`` over every position, the same for every kernel tap).
      Compare within each output row: ``prune_mask(..., per_row=True)``.
    - ``random``: uniform scores in ``[0, 1)`` drawn from ``generator`` (required).
    """
    if criterion == "magnitude":
        return weight.detach().abs()
    if criterion == "wanda":
        dim = _check_dim(weight, input_dim, "input_dim")
        if input_norms is None:
            raise ValueError("input_norms: the wanda criterion needs the input-feature norms")
        if input_norms.dim() != 1 or input_norms.numel() != weight.shape[dim]:
            raise ValueError(
                f"input_norms: expected a 1-D tensor of length {weight.shape[dim]} "
                f"(weight dim {dim}), got shape {tuple(input_norms.shape)}"
            )
        view = [1] * weight.dim()
        view[dim] = -1
        norms = input_norms.detach().to(device=weight.device, dtype=weight.dtype).reshape(view)
        return weight.detach().abs() * norms
    if criterion == "random":
        if generator is None:
            raise ValueError("generator: the random criterion needs a seeded torch.Generator")
        scores = torch.rand(weight.shape, generator=generator, device=generator.device)
        return scores.to(weight.device)
    raise ValueError(f"criterion: unknown pruning criterion {criterion!r}")


def prune_mask(
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    sparsity: float,
    criterion: str = "magnitude",
    *,
    input_norms: torch.Tensor | None = None,
    input_dim: int = 1,
    generator: torch.Generator | None = None,
    per_row: bool = False,
    output_dim: int = 0,
    n_keep: int | None = None,
) -> torch.Tensor:
    """New mask keeping the best ``int((1 - s) * N)`` coordinates of the current active set.

    Pruning never revives: coordinates already pruned stay pruned (growth happens only at commit),
    so when ``sparsity`` is below the current one the mask comes back unchanged.

    ``n_keep`` (from :func:`layer_keep_counts`, for global or ERK) replaces ``int((1 - s) * N)``.
    With ``per_row`` each output row (slice along ``output_dim``) keeps its own top-k, see
    :func:`row_quotas` for how the exact total is split among the rows.
    """
    if n_keep is None:
        n_keep = keep_count(weight.numel(), sparsity)
    scores = prune_scores(
        weight, criterion, input_norms=input_norms, input_dim=input_dim, generator=generator
    )
    return keep_top(scores, n_keep, mask, per_row=per_row, output_dim=output_dim)


def keep_top(
    scores: torch.Tensor,
    n_keep: int,
    eligible: torch.Tensor | None,
    *,
    per_row: bool = False,
    output_dim: int = 0,
) -> torch.Tensor:
    """The ``n_keep`` best ``eligible`` coordinates by ``scores``: over the whole layer, or split
    exactly among output rows when ``per_row`` (Wanda's comparison, see :func:`row_quotas`)."""
    if per_row:
        return rowwise_topk_mask(scores, n_keep, eligible=eligible, output_dim=output_dim)
    return topk_mask(scores, n_keep, eligible=eligible)


def row_quotas(active: Sequence[int], n_keep: int) -> list[int]:
    """How many coordinates each row keeps so that the rows keep exactly ``n_keep`` in all.

    ``active[i]`` is the number of currently active coordinates of row ``i`` (a row can keep no
    more). Water filling: the largest level ``L`` with ``sum(min(active_i, L)) <= n_keep`` is
    found, every row keeps ``min(active_i, L)``, and the remainder goes one each to the rows that
    still have room (``active_i > L``), lowest row index first. With every row fully active this is
    ``n_keep // R`` per row plus one for rows ``0 .. n_keep % R - 1``. If ``n_keep`` is at least
    the number of active coordinates, every row keeps all of its active ones.
    """
    active = [int(a) for a in active]
    n_keep = max(0, int(n_keep))
    if n_keep >= sum(active):
        return list(active)
    lo, hi = 0, max(active, default=0)  # f(lo) <= n_keep < f(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sum(min(a, mid) for a in active) <= n_keep:
            lo = mid
        else:
            hi = mid
    quotas = [min(a, lo) for a in active]
    remainder = n_keep - sum(quotas)
    for i, a in enumerate(active):
        if remainder == 0:
            break
        if a > lo:
            quotas[i] += 1
            remainder -= 1
    return quotas


def rowwise_topk_mask(
    scores: torch.Tensor,
    n_keep: int,
    eligible: torch.Tensor | None = None,
    output_dim: int = 0,
) -> torch.Tensor:
    """Bool mask with exactly ``min(n_keep, #eligible)`` True, chosen row by row.

    A row is a slice of ``scores`` along ``output_dim``; row ``i`` keeps its ``row_quotas(...)[i]``
    largest eligible scores, equal scores broken by the lower index within the row.
    """
    dim = _check_dim(scores, output_dim, "output_dim")
    moved = scores.movedim(dim, 0)
    rows = moved.shape[0]
    flat = moved.reshape(rows, -1).float()
    if eligible is None:
        elig = torch.ones_like(flat, dtype=torch.bool)
    else:
        if eligible.shape != scores.shape:
            raise ValueError(
                f"mask: shape {tuple(eligible.shape)} does not match {tuple(scores.shape)}"
            )
        elig = eligible.movedim(dim, 0).reshape(rows, -1).bool()
    quotas = row_quotas(elig.sum(1).tolist(), n_keep)
    quota = torch.tensor(quotas, dtype=torch.int64, device=flat.device)
    keyed = flat.masked_fill(~elig, float("-inf"))
    order = torch.sort(keyed, dim=1, descending=True, stable=True).indices
    cols = flat.shape[1]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=flat.device).expand(rows, cols))
    chosen = (ranks < quota[:, None]) & elig
    return chosen.reshape(moved.shape).movedim(0, dim)


def layer_keep_counts(
    numels: Sequence[int],
    sparsity: float,
    distribution: str,
    *,
    shapes: Sequence[Sequence[int]] | None = None,
    scores: Sequence[torch.Tensor] | None = None,
    eligible: Sequence[torch.Tensor | None] | None = None,
) -> list[int]:
    """Number of coordinates each layer keeps at the overall ``sparsity``.

    - ``uniform``: ``int((1 - s) * N)`` for every layer.
    - ``global``: one threshold over all layers' ``scores``: the top ``int((1 - s) * sum N)``
      scores overall stay (among ``eligible``, if given; ties by layer order, then index), every
      layer keeping at least :data:`GLOBAL_FLOOR_SHARE` of its uniform count (its own top
      scores), so that a layer of small weights is never pruned away whole.
    - ``erk``: Erdos-Renyi-Kernel (RigL ``get_sparsities``, power scale 1): a layer's density is
      ``eps * sum(shape) / prod(shape)``, over (out, in, *kernel) for a convolution kernel and
      ``(out + in) / (out * in)`` for a 2-D weight; layers whose density would exceed 1 are made dense (the
      largest raw density first, one level per round) and ``eps`` is solved again for the rest.
      The real-valued counts are floored and the remainder handed out one each by largest
      fractional part, ties by lower layer index, so the counts sum to exactly
      ``int((1 - s) * sum N)``.
    """
    numels = [int(n) for n in numels]
    if distribution == "uniform":
        return [keep_count(n, sparsity) for n in numels]
    target = keep_count(sum(numels), sparsity)
    if distribution == "global":
        return _global_counts(numels, sparsity, target, scores, eligible)
    if distribution == "erk":
        if shapes is None or len(shapes) != len(numels):
            raise ValueError("shapes: the erk distribution needs one shape per layer")
        for shape, n in zip(shapes, numels, strict=True):
            if math.prod(int(d) for d in shape) != n:
                raise ValueError(f"shapes: shape {tuple(shape)} does not hold {n} elements")
        return _erk_counts([[int(d) for d in s] for s in shapes], numels, target)
    raise ValueError(f"distribution: unknown layer distribution {distribution!r}")


def _global_counts(
    numels: list[int],
    sparsity: float,
    target: int,
    scores: Sequence[torch.Tensor] | None,
    eligible: Sequence[torch.Tensor | None] | None,
) -> list[int]:
    """``layer_keep_counts``' ``global`` rule: every layer's floor from its own top scores, the
    rest of ``target`` by one threshold over all layers."""
    if scores is None:
        raise ValueError("scores: the global distribution needs every layer's scores")
    if len(scores) != len(numels) or any(
        t.numel() != n for t, n in zip(scores, numels, strict=True)
    ):
        raise ValueError("scores: expected one tensor per layer with that layer's numel")
    if not numels:
        return []
    if eligible is not None and len(eligible) != len(numels):
        raise ValueError("eligible: expected one mask (or None) per layer")
    device = scores[0].device
    layers = [t.detach().reshape(-1).float().to(device) for t in scores]
    allowed = None  # every coordinate, unless some layer's eligible set says otherwise
    if eligible is not None and any(e is not None for e in eligible):
        allowed = [
            torch.ones(n, dtype=torch.bool, device=device)
            if e is None
            else e.reshape(-1).bool().to(device)
            for e, n in zip(eligible, numels, strict=True)
        ]
    floors = global_floors(numels, sparsity)
    # One threshold first: where every layer keeps its floor under it (a layer's floor is its own
    # top scores, so they are inside the threshold's choice), that choice is the rule's. Counts
    # stay on the device until one host sync; only a binding floor takes the per-layer path.
    flat = torch.cat(layers)
    one = topk_mask(flat, target, eligible=None if allowed is None else torch.cat(allowed))
    under_one = [part.sum() for part in torch.split(one, numels)]
    if allowed is None:
        counts, sizes = torch.stack(under_one).tolist(), numels
    else:
        available = [a.sum() for a in allowed]
        counts, sizes = torch.stack([torch.stack(under_one), torch.stack(available)]).tolist()
    if all(c >= min(f, a) for c, f, a in zip(counts, floors, sizes, strict=True)):
        return [int(c) for c in counts]
    if allowed is None:
        allowed = [torch.ones(n, dtype=torch.bool, device=device) for n in numels]
    kept = [topk_mask(t, f, eligible=a) for t, f, a in zip(layers, floors, allowed, strict=True)]
    kept_counts = torch.stack([k.sum() for k in kept])
    rest = target - int(kept_counts.sum())
    others = torch.cat([a & ~k for a, k in zip(allowed, kept, strict=True)])
    chosen = topk_mask(flat, rest, eligible=others)
    chosen_counts = torch.stack([part.sum() for part in torch.split(chosen, numels)])
    return [int(c) for c in (kept_counts + chosen_counts).tolist()]


#: The share of its uniform count every layer keeps under the ``global`` distribution.
GLOBAL_FLOOR_SHARE = 0.1


def global_floors(numels: Sequence[int], sparsity: float) -> list[int]:
    """Each layer's guaranteed count under ``global``: :data:`GLOBAL_FLOOR_SHARE` of
    ``int((1 - s) * N)``, at least one coordinate where the uniform rule keeps any."""
    floors = []
    for n in numels:
        uniform = keep_count(n, sparsity)
        floors.append(min(uniform, max(1, int(GLOBAL_FLOOR_SHARE * uniform))) if uniform else 0)
    return floors


def _erk_counts(shapes: list[list[int]], numels: list[int], target: int) -> list[int]:
    raw = [sum(s) / n if n > 0 else 0.0 for s, n in zip(shapes, numels, strict=True)]
    dense: set[int] = set()
    eps = 0.0
    while True:
        sparse = [i for i in range(len(numels)) if i not in dense and numels[i] > 0]
        if not sparse:
            break
        rhs = target - sum(numels[i] for i in dense)
        divisor = sum(raw[i] * numels[i] for i in sparse)
        eps = rhs / divisor
        max_raw = max(raw[i] for i in sparse)
        if max_raw * eps > 1.0:
            dense.update(i for i in sparse if raw[i] == max_raw)
        else:
            break
    real = [float(n) if (i in dense or n == 0) else eps * raw[i] * n for i, n in enumerate(numels)]
    counts = [min(n, max(0, math.floor(r))) for r, n in zip(real, numels, strict=True)]
    frac = [r - math.floor(r) for r in real]
    remainder = target - sum(counts)
    while remainder > 0:  # largest fractional part first, ties by lower layer index
        room = sorted(
            (i for i in range(len(numels)) if counts[i] < numels[i]), key=lambda i: (-frac[i], i)
        )
        for i in room[:remainder]:
            counts[i] += 1
        remainder = target - sum(counts)
    while remainder < 0:  # float overshoot: take back from the smallest fractional part
        some = sorted((i for i in range(len(numels)) if counts[i] > 0), key=lambda i: (frac[i], -i))
        for i in some[:-remainder]:
            counts[i] -= 1
        remainder = target - sum(counts)
    return counts


def nm_mask(scores: torch.Tensor, n: int, m: int, input_dim: int = 1) -> torch.Tensor:
    """Bool N:M mask: the top ``n`` of every ``m`` consecutive inputs (along ``input_dim``).

    Groups are ``[0, m), [m, 2m), ...`` of the input dim within each row; ties by lower index.
    For a convolution kernel (out, in, *kernel) with ``input_dim=1`` a group is ``m`` consecutive
    input channels at one kernel position of one output channel (the layout of the implicit GEMM
    with channels last, as NVIDIA's ASP prunes convolutions for sparse tensor cores).
    """
    dim = _check_dim(scores, input_dim, "input_dim")
    if m <= 0 or n < 0 or n > m:
        raise ValueError(f"n, m: need 0 <= n <= m and m > 0, got n={n}, m={m}")
    size = scores.shape[dim]
    if size % m != 0:
        raise ValueError(f"m: input dim {dim} of size {size} is not divisible by m={m}")
    moved = scores.movedim(dim, -1)
    groups = moved.reshape(-1, m).float()
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m, device=groups.device).expand_as(order))
    return (ranks < n).reshape(moved.shape).movedim(-1, dim)


def transposable_nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask of a 2-D ``scores`` in which every ``m x m`` block (rows ``[i, i + m)``, columns
    ``[j, j + m)``) keeps exactly ``n`` of each of its rows and ``n`` of each of its columns: the
    one pattern of the block with the largest score sum (ties: the first in the enumeration order
    of :func:`_transposable_patterns`, which prefers lower columns in the first rows).

    The mask is N:M along both dims, so the weight and its transpose both run on sparse tensor
    cores (Hubara et al. 2021, "Accelerated Sparse Neural Training"); the search is exact, every
    pattern of a block is scored (90 for 2:4).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores: a transposable mask needs a 2-D weight, got {scores.dim()}-D")
    rows, cols = scores.shape
    if rows % m or cols % m:
        raise ValueError(f"m: shape {tuple(scores.shape)} is not divisible by m={m} in both dims")
    patterns = _transposable_patterns(n, m).to(scores.device)
    blocks = (
        scores.double().reshape(rows // m, m, cols // m, m).permute(0, 2, 1, 3).reshape(-1, m * m)
    )
    # Bounded scratch: at most ~2^25 block x pattern sums at a time.
    chunk = max(1, (1 << 25) // patterns.shape[0])
    best = torch.cat([(part @ patterns.T).argmax(dim=1) for part in blocks.split(chunk)])
    chosen = patterns.bool()[best]
    return chosen.reshape(rows // m, cols // m, m, m).permute(0, 2, 1, 3).reshape(rows, cols)


@functools.cache
def _transposable_patterns(n: int, m: int) -> torch.Tensor:
    """Every ``m x m`` 0/1 block with ``n`` ones in each row and each column, flattened row by
    row, as float64 ``[patterns, m * m]``: rows' choices enumerated lowest columns first."""
    if not 0 < n < m <= 4:
        raise ValueError(f"n, m: a transposable pattern needs 0 < n < m <= 4, got n={n}, m={m}")
    row_choices = list(itertools.combinations(range(m), n))
    found = []
    for choice in itertools.product(row_choices, repeat=m):
        block = torch.zeros(m, m, dtype=torch.float64)
        for row, columns in enumerate(choice):
            block[row, list(columns)] = 1
        if bool((block.sum(dim=0) == n).all()):
            found.append(block.flatten())
    return torch.stack(found)


def pattern_mask(
    scores: torch.Tensor, n: int, m: int, *, input_dim: int = 1, transposable: bool = False
) -> torch.Tensor:
    """The N:M mask of a weight: :func:`transposable_nm_mask` for a 2-D weight when
    ``transposable`` (its blocks are the same in either orientation, so ``input_dim`` does not
    matter), else :func:`nm_mask` (convolution kernels always: their products stay dense)."""
    if transposable and scores.dim() == 2:
        return transposable_nm_mask(scores, n, m)
    return nm_mask(scores, n, m, input_dim=input_dim)


def _check_dim(tensor: torch.Tensor, dim: int, name: str) -> int:
    if tensor.dim() == 0 or not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"{name}: {dim} is not a dim of a tensor of shape {tuple(tensor.shape)}")
    return dim % tensor.dim()
