"""Run the Triton kernels in the interpreter when there is no GPU.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so this must happen before any test
module imports ``resu_compile.kernels``: a conftest is imported first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
