"""``model.resu.export()``: a plain state dict of the original model with pruned weights zeroed.

The result loads with ``original_model.load_state_dict(...)`` without resu-compile: names are
those of the original module's ``state_dict()``, every managed weight is ``W * M`` (exact zeros on
the pruned coordinates, so theta values trained in a running RESU phase are dropped), and every
other entry is unchanged. All tensors are detached CPU clones.
"""

from __future__ import annotations

import torch

from resu_compile.state import StateManager


def export_state_dict(state: StateManager, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of ``model`` with each managed weight multiplied by its mask."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: its original module
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        # keep_vars=True yields the Parameter objects, so managed weights are found by identity
        # (tied weights appear under each of their names, as in a plain state_dict()).
        for name, value in model.state_dict(keep_vars=True).items():
            tensor = value.detach()
            weight = state.get(value)
            mask = weight.mask() if weight is not None else None
            if mask is not None:
                tensor = tensor.masked_fill(~mask, 0)
                out[name] = tensor.cpu()  # masked_fill already made a new tensor
            else:
                out[name] = tensor.to("cpu", copy=True)
    return out
