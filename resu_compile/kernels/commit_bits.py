"""The commit's bookkeeping on packed masks, every managed weight in one launch.

After the amnesty tournament has chosen each weight's new mask, the commit (METHOD.md sections 5
and 6) needs, per weight, the resurrected set ``new & ~old``, the coordinates whose optimizer state
survives (``new & old``: the newly pruned and the resurrected restart from zero), the updated
"ever resurrected" bits, and four counts for telemetry. Weight by weight in PyTorch that is a dozen
launches each plus a host sync per weight; here it is one pass over the packed bytes (N/8 per
input) that writes the two new bit tensors and a row of counts per chunk
(:mod:`resu_compile.kernels.triton.commit_bits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from resu_compile.kernels.bits import count_bits
from resu_compile.kernels.launch import on_gpu

COUNTS = ("resurrected", "churn", "survivors", "resurrected_trained")


class CommitBits(NamedTuple):
    """Per weight: the state-keeping bits, the updated revived bits, and the counts."""

    keep_state: list[torch.Tensor]  # new & old
    revived: list[torch.Tensor]  # revived | (new & ~old)
    counts: torch.Tensor  # int64 [weights, 4], columns as COUNTS


def commit_bits(
    old: Sequence[torch.Tensor],
    new: Sequence[torch.Tensor],
    trained: Sequence[torch.Tensor],
    revived: Sequence[torch.Tensor],
    numels: Sequence[int],
) -> CommitBits:
    """The commit's bit algebra and counts for weights of ``numels`` elements (every argument
    packed bits on one device)."""
    if on_gpu([*old, *new, *trained, *revived]):
        from resu_compile.kernels.triton.commit_bits import commit_bits_triton

        return CommitBits(*commit_bits_triton(old, new, trained, revived, numels))
    return commit_bits_reference(old, new, trained, revived)


def commit_bits_reference(
    old: Sequence[torch.Tensor],
    new: Sequence[torch.Tensor],
    trained: Sequence[torch.Tensor],
    revived: Sequence[torch.Tensor],
) -> CommitBits:
    """Byte operations weight by weight (the CPU path and the oracle)."""
    keep, revived_out, counts = [], [], []
    for o, n, t, r in zip(old, new, trained, revived, strict=True):
        resurrected = n & ~o
        keep.append(n & o)
        revived_out.append(r | resurrected)
        counts.append(
            [count_bits(x) for x in (resurrected, n ^ o, r & n, resurrected & t)],
        )
    device = old[0].device if old else torch.device("cpu")
    return CommitBits(keep, revived_out, torch.tensor(counts, dtype=torch.int64, device=device))
