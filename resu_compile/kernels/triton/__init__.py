"""The Triton kernels, one module per family; imported only when a tensor needs them.

Each family's public entry point (``resu_compile.kernels.<family>``) routes CUDA tensors here and
everything else to its pure-PyTorch reference, so ``import resu_compile`` never imports Triton and
CPU users need no Triton at all. The CPU tests run these kernels under ``TRITON_INTERPRET=1``.
"""
