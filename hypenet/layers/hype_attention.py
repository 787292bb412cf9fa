"""The HyPE attention mixer of HypeNet: Qwen3 attention without RoPE, with an output gate and position-dependent
logit scaling (SPEC 1.2)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from hypenet.cache import HypeNetCache, SequenceLayout, run_unpadded
from hypenet.ops import hype_attn, hype_attn_decode, qk_norm_rope

from .norm import HypeNetRMSNorm
from .rotary import identity_rope_tables, rope_tables

if TYPE_CHECKING:
    from hypenet.config import HypeNetConfig


class HypeAttention(nn.Module):
    """HyPE attention layer. Parameters: q/k/v/o_proj (GQA), per-head q_norm/k_norm ([D], shared by the heads),
    and `o_gate` (d -> Hq*D) when `config.attn_use_output_gate`.

    The logit of query t and key j <= t is `c * s_t * (q_t . k_j) / sqrt(D)` where, from `attn_logits_scaling`:
    "hype <a>" gives s_t = ln(t + a) / ln(a) and c = 1 (ops get alpha=a, scale=D^-0.5); a number c gives s_t = 1
    (ops get alpha=None, scale=c * D^-0.5); None gives s_t = 1, c = 1. Positions t count real tokens only.
    RoPE is applied only with `config.attn_use_rope` (to reproduce a Qwen3 teacher); HypeNet has none.
    The output is `o_proj(o * sigmoid(o_gate(x)))` with the gate, `o_proj(o)` without.

    forward(hidden_states, position_ids=None, attention_mask=None, *, position_embeddings=None,
            past_key_values=None, layout=None) -> Tensor: the same contract as `LightningAttention.forward`;
            without RoPE, position_embeddings are identity tables (cos = 1, sin = 0) or None.
    """

    def __init__(self, config: "HypeNetConfig", layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.use_rope = config.attn_use_rope
        self.rope_theta = config.rope_theta
        self.eps = config.rms_norm_eps
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = HypeNetRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = HypeNetRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_gate = (nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
                       if config.attn_use_output_gate else None)

    def forward(self, hidden_states: Tensor, position_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, *,
                position_embeddings: Optional[tuple[Tensor, Tensor]] = None,
                past_key_values: Optional[HypeNetCache] = None,
                layout: Optional[SequenceLayout] = None) -> Tensor:
        if attention_mask is not None:
            return run_unpadded(self, hidden_states, position_ids, attention_mask)
        B, T, _ = hidden_states.shape
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if position_embeddings is not None:
            cos, sin = position_embeddings
        elif not self.use_rope:
            cos, sin = identity_rope_tables(T, D, hidden_states.dtype, hidden_states.device)
        else:
            if position_ids is None:
                position_ids = torch.arange(T, device=hidden_states.device)[None]
            cos, sin = rope_tables(position_ids, D, self.rope_theta, hidden_states.dtype)

        q = self.q_proj(hidden_states).view(B, T, Hq, D)
        k = self.k_proj(hidden_states).view(B, T, Hkv, D)
        v = self.v_proj(hidden_states).view(B, T, Hkv, D)
        q, k = qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, eps=self.eps)
        # Read from the config at every call: HALO sets attn_logits_scaling on a trained model.
        alpha = self.config.hype_alpha
        scale = self.config.attn_logits_multiplier * D ** -0.5
        cu_seqlens = layout.cu_seqlens if layout is not None else None

        if past_key_values is None:
            o = hype_attn(q, k, v, alpha=alpha, scale=scale, cu_seqlens_q=cu_seqlens,
                          cu_seqlens_k=cu_seqlens)
        elif layout.mode == "decode":
            k_cache, v_cache, cache_seqlens = past_key_values.append_kv(self.layer_idx, k, v, layout)
            o = hype_attn_decode(q, k_cache, v_cache, cache_seqlens, alpha=alpha, scale=scale)
        else:
            keys, values, cu_seqlens_k = past_key_values.append_kv(self.layer_idx, k, v, layout)
            o = hype_attn(q, keys, values, alpha=alpha, scale=scale, cu_seqlens_q=cu_seqlens,
                          cu_seqlens_k=cu_seqlens_k)

        o = o.reshape(B, T, Hq * D)
        if self.o_gate is not None:
            o = o * torch.sigmoid(self.o_gate(hidden_states))
        return self.o_proj(o)
