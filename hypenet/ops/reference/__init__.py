"""Naive PyTorch oracles of every public op: readable, float32 inside, differentiable by autograd.
They are the specification, the test oracle and the CPU fallback."""

from .hype_attention import hype_attn_decode_ref, hype_attn_lse_ref, hype_attn_ref, hype_logit_scale
from .lightning import lightning_attn_recurrent_ref, lightning_attn_ref, lightning_attn_step_ref
from .norm import qk_norm_rope_ref, rmsnorm_gate_ref

__all__ = [
    "hype_attn_decode_ref", "hype_attn_lse_ref", "hype_attn_ref", "hype_logit_scale", "lightning_attn_recurrent_ref",
    "lightning_attn_ref", "lightning_attn_step_ref", "qk_norm_rope_ref", "rmsnorm_gate_ref",
]
