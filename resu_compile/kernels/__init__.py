"""Kernels: packed bits, the resu custom ops, pure-PyTorch references and their Triton versions."""
