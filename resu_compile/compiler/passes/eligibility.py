"""Which weight candidates are managed, and why the others are not (shown in the report).

Default rule: a trainable floating-point Parameter of 2+ dims, used only as the weight of matmuls
or convolutions, that is not a LoRA adapter. ``include=`` can also select frozen weights
(``requires_grad=False``, e.g. PEFT's ``base_layer.weight``) and LoRA adapters: a weight the
default rule leaves out for being frozen or an adapter is managed when ``include`` is given and
matches it. A managed frozen weight is pruned at prune and commit time, but nothing trains it.
"""

from __future__ import annotations

import torch

from resu_compile.compiler.passes.match import WeightCandidate
from resu_compile.config import ResuConfig

# The parameter containers of a PEFT LoRA layer (``peft.tuners.lora.LoraLayer``): the adapters.
LORA_ADAPTER_NAMES = (
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
)
LORA_REASON = "LoRA adapter (peft)"


def lora_adapter_ids(module: torch.nn.Module) -> frozenset[int]:
    """Identities of the LoRA adapter parameters of ``module``.

    By module type when peft is importable (the adapter containers of every ``LoraLayer``,
    whatever their names), and by the name rule of :func:`is_lora_name` (which also finds them
    when peft is not installed, so the managed set does not depend on it).
    """
    found = {id(p) for n, p in module.named_parameters(remove_duplicate=False) if is_lora_name(n)}
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return frozenset(found)
    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            for attr in LORA_ADAPTER_NAMES:
                part = getattr(layer, attr, None)
                if isinstance(part, torch.nn.Module):
                    found.update(id(p) for p in part.parameters())
    return frozenset(found)


def is_lora_name(name: str) -> bool:
    """Whether a component of the dotted ``name`` is one of PEFT's LoRA adapter containers."""
    return any(part in LORA_ADAPTER_NAMES for part in name.split("."))


def param_skip_reason(
    name: str, param: torch.Tensor, config: ResuConfig, lora_adapter: bool
) -> str | None:
    """The reason to skip ``param`` that its graph uses do not decide, or None.

    Only for a parameter the include / exclude filter keeps; ``lora_adapter`` says whether it is
    a LoRA adapter weight (see :func:`lora_adapter_ids`).
    """
    if not param.is_floating_point():
        return f"not a floating-point weight ({param.dtype})"
    if param.dim() < 2:
        return f"{param.dim()}-D parameter"
    explicit = config.include is not None  # the filter kept it, so include names it
    if lora_adapter and not explicit:
        return LORA_REASON
    if not param.requires_grad and not explicit:
        return "frozen (requires_grad=False; include= can select it for pruning)"
    return None


def skip_reason(
    candidate: WeightCandidate, name: str, config: ResuConfig, lora_adapter: bool
) -> str | None:
    """None if the candidate is managed, else the reason it is skipped.

    The user's include / exclude filter is checked first, so every other reason is about a
    weight the user's filter selects. Raises ``ValueError`` for a grouped convolution kernel
    under a Wanda criterion or amnesty score (see :func:`_check_input_norms`).
    """
    if not candidate.weight_ops and not candidate.other_uses:
        return "not used in this graph"
    if not config.selects(name, candidate.param):
        return "excluded by the include / exclude filter"
    reason = param_skip_reason(name, candidate.param, config, lora_adapter)
    if reason is not None:
        return reason
    if candidate.other_uses:
        uses = ", ".join(sorted(set(candidate.other_uses)))
        return f"has non-matmul users ({uses})"
    _check_input_norms(candidate, name, config)
    return None


def _check_input_norms(candidate: WeightCandidate, name: str, config: ResuConfig) -> None:
    """Wanda needs one input norm per kernel column; a grouped convolution's rows read different
    input channels through the same column, so its scores would be wrong: refuse, naming it."""
    if not candidate.grouped_conv:
        return
    for option, value in (("criterion", config.criterion), ("amnesty_score", config.amnesty_score)):
        if value == "wanda":
            raise ValueError(
                f"{option} 'wanda': managed weight {name!r} is the kernel of a grouped or "
                "depthwise convolution, whose rows read different input channels, so Wanda's "
                f"per-input-channel norms do not apply; exclude it (exclude=[{name!r}]) or use "
                f"{option}='magnitude'"
            )
