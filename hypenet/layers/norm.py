"""Qwen3's RMSNorm, the norm of the residual stream; its `weight` also feeds the fused norms of the mixers."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class HypeNetRMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps), computed in float32 and cast back, then times `weight` [C]."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
