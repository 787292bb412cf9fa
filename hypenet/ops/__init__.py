"""The public op API of hypenet: validation, backend dispatch, autograd and torch.library registration.

Every op has a naive PyTorch reference (hypenet.ops.reference), Triton kernels (triton_ops) and, where built,
CUDA kernels (hypenet._C); `backend=` or $HYPENET_BACKEND forces one, otherwise the fastest that supports the
inputs runs.
"""

from .dispatch import BACKENDS
from .hype_attention import hype_attn, hype_attn_decode
from .lightning import lightning_attn, lightning_attn_step
from .norm import qk_norm_rope, rmsnorm_gate

__all__ = ["BACKENDS", "hype_attn", "hype_attn_decode", "lightning_attn", "lightning_attn_step", "qk_norm_rope",
           "rmsnorm_gate"]
