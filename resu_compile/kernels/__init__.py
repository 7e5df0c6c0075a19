"""Kernels: packed bits, graph ops, and one module per kernel family (its entry point and its
pure-PyTorch reference); the Triton kernels live in :mod:`resu_compile.kernels.triton`, imported
only when a CUDA tensor needs them."""
