"""The Lightning Attention mixer of HypeNet: a linear-attention RNN with a constant per-head decay (SPEC 1.1)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from hypenet.ops import lightning_attn, lightning_attn_step, qk_norm_rope, rmsnorm_gate

from hypenet.cache import HypeNetCache, SequenceLayout, run_unpadded

from .norm import HypeNetRMSNorm
from .rotary import rope_tables

if TYPE_CHECKING:
    from hypenet.config import HypeNetConfig


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes m_h, h = 1..H, in float64.

    For H a power of two, m_h = 2^(-8h/H). Otherwise, with P the largest power of two <= H, take P's slopes and
    append the first H - P of every other slope of the 2P list (the slopes at odd h of 2P).
    Lightning uses them as per-step decays gamma_h = exp(-m_h): 0.4931 ... 0.9961 for H = 16.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")

    def power_of_two_slopes(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    power = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two_slopes(power)
    if power < num_heads:
        slopes += power_of_two_slopes(2 * power)[0::2][: num_heads - power]
    return slopes


class LightningAttention(nn.Module):
    """Lightning Attention layer (SPEC 1.1). Parameters: q/k/v/z/o_proj, q_norm, k_norm, o_norm.

    Stand-alone use (as HALO stage 1 does, one layer per teacher layer):

        layer = LightningAttention(config, layer_idx)
        y = layer(hidden_states, position_ids)          # [B, T, d] -> [B, T, d]

    forward(hidden_states, position_ids=None, attention_mask=None, *, position_embeddings=None,
            past_key_values=None, layout=None) -> Tensor
        hidden_states: [B, T, d] (the normed input of the layer); or [1, N, d] packed tokens when `layout` is packed.
        position_ids: [B, T] integer RoPE positions; default 0..T-1 in every row.
        attention_mask: [B, T] optional padding mask (1 = token, 0 = padding); padding never enters the state and
            its outputs are zero. (Inside HypeNetModel the padding is already removed and this stays None.)
        position_embeddings: (cos, sin) [B or 1, T, D] precomputed tables; computed from position_ids when None.
        past_key_values: a HypeNetCache to read and update (decode / chunked prefill), with the `layout` that
            HypeNetCache.plan returned for this forward call.
    Returns [B, T, d] in the input dtype (same leading shape as hidden_states).

    `log_decay` (= -alibi_slopes(H), float32) is neither a parameter nor a buffer but a constant kept per device,
    so `model.to(dtype)` never rounds it.
    """

    def __init__(self, config: "HypeNetConfig", layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.lightning_nh
        self.head_dim = config.lightning_head_dim
        self.rope_theta = config.rope_theta
        self.eps = config.rms_norm_eps
        self.scale = config.lightning_output_scale
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.z_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.q_norm = HypeNetRMSNorm(self.head_dim, eps=config.rms_norm_eps)  # one weight [D] shared by all heads
        self.k_norm = HypeNetRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_norm = HypeNetRMSNorm(inner, eps=config.rms_norm_eps)  # over all H*D channels together
        self._log_decay: dict[torch.device, Tensor] = {}

    def log_decay(self, device: torch.device) -> Tensor:
        """-m_h for every head, [H] float32 on `device` (one tensor per device, so the ops validate it once)."""
        if device not in self._log_decay:
            slopes = torch.tensor(alibi_slopes(self.num_heads), dtype=torch.float64)
            self._log_decay[device] = (-slopes).to(device=device, dtype=torch.float32)
        return self._log_decay[device]

    def forward(self, hidden_states: Tensor, position_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, *,
                position_embeddings: Optional[tuple[Tensor, Tensor]] = None,
                past_key_values: Optional[HypeNetCache] = None,
                layout: Optional[SequenceLayout] = None) -> Tensor:
        if attention_mask is not None:
            return run_unpadded(self, hidden_states, position_ids, attention_mask)
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        if position_embeddings is None:
            if position_ids is None:
                position_ids = torch.arange(T, device=hidden_states.device)[None]
            position_embeddings = rope_tables(position_ids, D, self.rope_theta, hidden_states.dtype)
        cos, sin = position_embeddings

        q = self.q_proj(hidden_states).view(B, T, H, D)
        k = self.k_proj(hidden_states).view(B, T, H, D)
        v = self.v_proj(hidden_states).view(B, T, H, D)
        z = self.z_proj(hidden_states)  # (B, T, H*D)
        q, k = qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, eps=self.eps)
        log_decay = self.log_decay(hidden_states.device)
        cu_seqlens = layout.cu_seqlens if layout is not None else None

        if past_key_values is None:
            o, _ = lightning_attn(q, k, v, log_decay, scale=self.scale, cu_seqlens=cu_seqlens)
        elif layout.mode == "decode":
            o = lightning_attn_step(q, k, v, log_decay, past_key_values.lightning_state(self.layer_idx),
                                    scale=self.scale)
        else:
            initial_state = past_key_values.lightning_initial_state(self.layer_idx, layout)
            o, final_state = lightning_attn(q, k, v, log_decay, scale=self.scale, initial_state=initial_state,
                                            output_final_state=True, cu_seqlens=cu_seqlens)
            past_key_values.store_lightning_state(self.layer_idx, final_state, layout)

        o = rmsnorm_gate(o.reshape(B, T, H * D), z, self.o_norm.weight, eps=self.eps)
        return self.o_proj(o)

