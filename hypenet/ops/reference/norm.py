"""Naive fused helpers of the HypeNet layers: the specification of `rmsnorm_gate` and `qk_norm_rope`.

RMSNorm is Qwen3's (x * rsqrt(mean(x^2) + eps), times weight); everything is computed in float32 and cast
to the input dtype once at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lightning import compute_dtype


def _rms_normalize(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim (the rotate-half RoPE convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rmsnorm_gate_ref(x: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm(x) * weight * sigmoid(z) over the last dim.

    Args:
        x, z (Tensor): [..., C] (same shape and dtype).
        weight (Tensor): [C].
    Returns:
        y [..., C] in x.dtype.
    """
    dtype = compute_dtype(x)
    y = _rms_normalize(x.to(dtype), eps) * weight.to(dtype) * torch.sigmoid(z.to(dtype))
    return y.to(x.dtype)


def qk_norm_rope_ref(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                     eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm over D (weights shared by all heads), then rotate-half RoPE.

    Args:
        q (Tensor): [B, T, Hq, D]; k (Tensor): [B, T, Hk, D].
        q_weight, k_weight (Tensor): [D].
        cos, sin (Tensor): [B or 1, T, D] rotary tables (each half of D repeated, as in transformers).
    Returns:
        (q_out, k_out) with the shapes and dtypes of q and k.
    """
    dtype = compute_dtype(q)
    cos_h, sin_h = cos.to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]  # (B, T, 1, D)

    def norm_rope(x: Tensor, weight: Tensor) -> Tensor:
        x = _rms_normalize(x.to(dtype), eps) * weight.to(dtype)
        return (x * cos_h + rotate_half(x) * sin_h).to(x.dtype)

    return norm_rope(q, q_weight).to(q.dtype), norm_rope(k, k_weight).to(k.dtype)
