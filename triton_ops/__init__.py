"""Triton kernels and their launchers (no autograd, no dispatch: hypenet.ops does those)."""
