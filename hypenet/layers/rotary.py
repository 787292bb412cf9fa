"""Rotary tables for `hypenet.ops.qk_norm_rope` (rotate-half convention, as in transformers' Qwen3)."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_tables(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin tables [B, T, D] at integer positions [B, T].

    Angles (position * theta^(-2i/D), each half of D repeated) are computed in float32, as transformers' Qwen3
    does (bit for bit), and cast to `dtype` once; float64 models get float64 angles.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=compute) / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # (D/2,)
    freqs = position_ids.to(compute)[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def identity_rope_tables(seq_len: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device) -> tuple[Tensor, Tensor]:
    """cos = 1, sin = 0 tables [1, T, D]: `qk_norm_rope` with them is the QK-norm alone (NoPE attention)."""
    return (torch.ones(1, seq_len, head_dim, dtype=dtype, device=device),
            torch.zeros(1, seq_len, head_dim, dtype=dtype, device=device))
