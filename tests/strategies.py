"""Hypothesis strategies shared by the op tests: shapes, packed offsets, decays."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def cu_seqlens(draw, total_max: int, n_max: int = 4):
    """Strictly increasing offsets [0, ..., T] of 1..n_max ragged sequences; returns (offsets list, T)."""
    n = draw(st.integers(1, n_max))
    lengths = draw(st.lists(st.integers(1, max(1, total_max // n)), min_size=n, max_size=n))
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return offsets, offsets[-1]


def log_decays(H: int, strength: float, seed: int) -> torch.Tensor:
    """Per-head log decays in [-strength, 0): strength near 0 is very weak decay, ~8 very strong."""
    g = torch.Generator().manual_seed(seed)
    return -(torch.rand(H, generator=g) * strength + 1e-4)


def randn(shape, dtype, device, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded normal noise (never zeros: zeros hide unwritten outputs and wrong indexing)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
