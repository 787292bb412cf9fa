"""Triton kernels of HyPE attention: forward, backward and split-KV decode (launchers only)."""
