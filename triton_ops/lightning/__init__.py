"""Triton kernels of Lightning Attention."""
