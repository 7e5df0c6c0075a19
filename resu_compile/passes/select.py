"""Which weight candidates are managed, and why the others are not (shown in the report)."""

from __future__ import annotations

from resu_compile.config import ResuConfig
from resu_compile.passes.match import WeightCandidate


def skip_reason(candidate: WeightCandidate, name: str, config: ResuConfig) -> str | None:
    """None if the candidate is managed, else the reason it is skipped.

    Default rule: a trainable floating-point Parameter of 2+ dims used only as a matmul weight.
    The user's include / exclude filters apply on top.
    """
    param = candidate.param
    if not candidate.matmul_ops and not candidate.other_uses:
        return "not used in this graph"
    if not param.is_floating_point():
        return f"not a floating-point weight ({param.dtype})"
    if not param.requires_grad:
        return "frozen (requires_grad=False)"
    if param.dim() < 2:
        return f"{param.dim()}-D parameter"
    if candidate.other_uses:
        uses = ", ".join(sorted(set(candidate.other_uses)))
        return f"has non-matmul users ({uses})"
    if not config.selects(name, param):
        return "excluded by the include / exclude filter"
    return None
