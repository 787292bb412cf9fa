"""Qwen3's RMSNorm, the norm of the residual stream; its `weight` also feeds the fused norms of the mixers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class HypeNetRMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps), computed in float32 and cast back, then times `weight` [C]."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # Nothing to round in float32 (the mixed-precision training case: fp32 residual stream and master
            # weights), so torch's fused kernel computes the same function in one pass forward and one backward
            # instead of about eight elementwise kernels each way.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
