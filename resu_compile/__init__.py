"""resu-compile: RESU sparse training as a torch.compile pass.

import resu_compile as resu
model = resu.compile(model, sparsity=0.7)     # or torch.compile(model, backend="resu")
...
loss.backward()
model.resu.step(optimizer)                    # instead of optimizer.step()
"""

from resu_compile.api import compile, controller
from resu_compile.compiler.backend import register as _register_backend
from resu_compile.config import ResuConfig
from resu_compile.runtime.controller import PhaseController
from resu_compile.runtime.phase import Phase

_register_backend()

__all__ = ["Phase", "PhaseController", "ResuConfig", "compile", "controller"]
