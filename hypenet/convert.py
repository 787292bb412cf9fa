"""Qwen3 -> HypeNet weight transfer (SPEC 2, step 0).

- `lightning_from_qwen3_attention(qwen3_attn, config, layer_idx)`: one Lightning layer from one Qwen3 attention
  layer (HALO stage 1 builds one per teacher layer).
- `hypenet_config_from_qwen3(qwen3_config, mixer_types, ...)`: the HypeNet config of a Qwen3 teacher.
- `convert_qwen3(teacher, mixer_types, ...)`: a whole HypeNetForCausalLM.

Transfer rules. Lightning layer: Wq, Wo, q_norm, k_norm copied; Wk and Wv reshaped to (Hkv, D, d) and repeated
along the head axis (head i reads teacher KV head floor(i / (H / Hkv))), turning GQA into MHA; z_proj drawn from
N(0, initializer_range) like any new projection; o_norm ones. Attention layer: q/k/v/o_proj, q_norm, k_norm copied;
the new output gate starts exactly neutral: o_gate = 0 makes sigmoid(x W_gate) = 1/2 everywhere, and o_proj is
doubled to compensate, so a converted attention layer first computes exactly the teacher's function (minus RoPE
when attn_use_rope is False), while the gate still receives gradients. Embeddings, norms, MLPs and lm_head are
copied unchanged.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from hypenet.config import HypeNetConfig
from hypenet.layers.hype_attention import HypeAttention
from hypenet.layers.lightning import LightningAttention
from hypenet.modeling import HypeNetForCausalLM


def _teacher_geometry(attn: nn.Module) -> tuple[int, int, int, int]:
    """(d, H, Hkv, D) of a Qwen3 attention module, read from its weights."""
    D = attn.q_norm.weight.shape[0]
    d = attn.q_proj.weight.shape[1]
    return d, attn.q_proj.weight.shape[0] // D, attn.k_proj.weight.shape[0] // D, D


def _check_no_bias(attn: nn.Module) -> None:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if getattr(attn, name).bias is not None:
            raise ValueError(f"the teacher's {name} has a bias (attention_bias=True); HypeNet projections have none")


def expand_kv_heads(weight: Tensor, num_kv_heads: int, num_heads: int) -> Tensor:
    """GQA -> MHA for a K or V projection weight [Hkv * D, d] -> [H * D, d]: head i gets KV head i // (H / Hkv)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    d = weight.shape[1]
    D = weight.shape[0] // num_kv_heads
    return weight.view(num_kv_heads, D, d).repeat_interleave(num_heads // num_kv_heads, dim=0).reshape(-1, d)


@torch.no_grad()
def _load_lightning_from_qwen3(layer: LightningAttention, attn: nn.Module, initializer_range: float) -> None:
    """Fill `layer` in place from a Qwen3 attention module (the transfer rules of the module docstring)."""
    _check_no_bias(attn)
    d, H, Hkv, D = _teacher_geometry(attn)
    if (H, D) != (layer.num_heads, layer.head_dim) or d != layer.q_proj.in_features:
        raise ValueError(f"the Qwen3 attention has hidden size {d}, {H} heads of size {D}, but the Lightning layer "
                         f"needs hidden size {layer.q_proj.in_features}, lightning_nh={layer.num_heads} and "
                         f"lightning_head_dim={layer.head_dim}")
    layer.q_proj.weight.copy_(attn.q_proj.weight)
    layer.k_proj.weight.copy_(expand_kv_heads(attn.k_proj.weight, Hkv, H))
    layer.v_proj.weight.copy_(expand_kv_heads(attn.v_proj.weight, Hkv, H))
    layer.o_proj.weight.copy_(attn.o_proj.weight)
    layer.q_norm.weight.copy_(attn.q_norm.weight)
    layer.k_norm.weight.copy_(attn.k_norm.weight)
    layer.z_proj.weight.normal_(0.0, initializer_range)
    layer.o_norm.weight.fill_(1.0)


def lightning_from_qwen3_attention(qwen3_attn: nn.Module, config: HypeNetConfig, layer_idx: int) -> LightningAttention:
    """A LightningAttention initialised from a transformers Qwen3Attention (SPEC 2 step 0), on the teacher's
    device and in its dtype. Needs config.lightning_nh == the teacher's heads and lightning_head_dim == head_dim."""
    weight = qwen3_attn.q_proj.weight
    layer = LightningAttention(config, layer_idx).to(device=weight.device, dtype=weight.dtype)
    _load_lightning_from_qwen3(layer, qwen3_attn, config.initializer_range)
    return layer


@torch.no_grad()
def _load_attention_from_qwen3(layer: HypeAttention, attn: nn.Module) -> None:
    """Copy a Qwen3 attention into a HyPE attention layer; a new o_gate starts neutral (zero, o_proj doubled)."""
    _check_no_bias(attn)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        target, source = getattr(layer, name).weight, getattr(attn, name).weight
        if target.shape != source.shape:
            raise ValueError(f"{name}: the Qwen3 weight has shape {tuple(source.shape)}, the HypeNet layer needs "
                             f"{tuple(target.shape)}")
        target.copy_(source)
    if layer.o_gate is not None:
        layer.o_gate.weight.zero_()
        layer.o_proj.weight.mul_(2.0)


def _rope_theta(qwen3_config) -> float:
    parameters = getattr(qwen3_config, "rope_parameters", None) or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"the teacher uses rope_type {rope_type!r}; only plain RoPE is implemented")
    if getattr(qwen3_config, "rope_scaling", None) not in (None, {}, parameters):
        raise ValueError(f"the teacher uses rope_scaling {qwen3_config.rope_scaling!r}; only plain RoPE is implemented")
    return float(parameters.get("rope_theta", getattr(qwen3_config, "rope_theta", 1_000_000.0)))


def hypenet_config_from_qwen3(qwen3_config, mixer_types: Sequence[str], *, attn_use_rope: bool = False,
                              attn_use_output_gate: bool = True, attn_logits_scaling=None,
                              **overrides) -> HypeNetConfig:
    """The HypeNetConfig of a student of `qwen3_config` (a transformers Qwen3Config): the teacher's sizes, Lightning
    heads = attention heads, Lightning head dim = head_dim; `overrides` replace any field."""
    if getattr(qwen3_config, "use_sliding_window", False):
        raise ValueError("the teacher uses sliding-window attention, which HypeNet does not implement")
    fields = dict(
        vocab_size=qwen3_config.vocab_size, hidden_size=qwen3_config.hidden_size,
        intermediate_size=qwen3_config.intermediate_size, num_hidden_layers=qwen3_config.num_hidden_layers,
        num_attention_heads=qwen3_config.num_attention_heads, num_key_value_heads=qwen3_config.num_key_value_heads,
        head_dim=qwen3_config.head_dim, hidden_act=qwen3_config.hidden_act, rms_norm_eps=qwen3_config.rms_norm_eps,
        rope_theta=_rope_theta(qwen3_config), tie_word_embeddings=bool(qwen3_config.tie_word_embeddings),
        initializer_range=getattr(qwen3_config, "initializer_range", 0.02),
        pad_token_id=qwen3_config.pad_token_id, bos_token_id=qwen3_config.bos_token_id,
        eos_token_id=qwen3_config.eos_token_id, mixer_types=list(mixer_types), attn_use_rope=attn_use_rope,
        attn_use_output_gate=attn_use_output_gate, attn_logits_scaling=attn_logits_scaling,
        lightning_nh=qwen3_config.num_attention_heads, lightning_nkv=qwen3_config.num_attention_heads,
        lightning_head_dim=qwen3_config.head_dim)
    return HypeNetConfig(**{**fields, **overrides})


def _load_teacher(teacher, dtype: Optional[torch.dtype]) -> nn.Module:
    if isinstance(teacher, (str, os.PathLike)):
        if not os.path.isdir(teacher):
            raise ValueError(f"teacher must be a Qwen3ForCausalLM or a local checkpoint directory, got {teacher!r}")
        teacher = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype if dtype is not None else "auto")
    model_type = getattr(getattr(teacher, "config", None), "model_type", None)
    if model_type != "qwen3":
        raise ValueError(f"teacher must be a Qwen3 causal LM (model_type 'qwen3'), got {type(teacher).__name__} "
                         f"with model_type {model_type!r}")
    return teacher


@torch.no_grad()
def convert_qwen3(teacher, mixer_types: Sequence[str], *, attn_use_rope: bool = False,
                  attn_use_output_gate: bool = True, attn_logits_scaling=None,
                  lightning_layers: Optional[dict[int, LightningAttention]] = None,
                  dtype: Optional[torch.dtype] = None, **config_overrides) -> HypeNetForCausalLM:
    """A HypeNetForCausalLM from a Qwen3 teacher (a transformers Qwen3ForCausalLM or a local checkpoint directory).

    Args:
        mixer_types: per layer "attn" (teacher attention kept, as HyPE attention) or "lightning-attn".
        attn_use_rope, attn_use_output_gate, attn_logits_scaling: the HypeNetConfig fields of the student
            (RoPE on, no gate and no scaling reproduce the teacher exactly when every layer is "attn").
        lightning_layers: trained Lightning layers by index (HALO stage 1) to use instead of a fresh transfer.
        dtype: dtype of the student (default: the teacher's).
        config_overrides: any other HypeNetConfig field.
    Returns the student on the teacher's device, in eval mode like a loaded model.
    """
    teacher = _load_teacher(teacher, dtype)
    config = hypenet_config_from_qwen3(teacher.config, mixer_types, attn_use_rope=attn_use_rope,
                                       attn_use_output_gate=attn_use_output_gate,
                                       attn_logits_scaling=attn_logits_scaling, **config_overrides)
    lightning_layers = lightning_layers or {}
    unknown = sorted(set(lightning_layers) - {i for i, m in enumerate(config.mixer_types) if m == "lightning-attn"})
    if unknown:
        raise ValueError(f"lightning_layers has layers {unknown} that are not 'lightning-attn' in mixer_types")
    reference = teacher.model.embed_tokens.weight
    dtype = dtype if dtype is not None else reference.dtype
    with torch.device(reference.device):
        student = HypeNetForCausalLM._from_config(config, dtype=dtype)
    student.eval()

    student.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight)
    student.model.norm.weight.copy_(teacher.model.norm.weight)
    if not config.tie_word_embeddings:
        student.lm_head.weight.copy_(teacher.lm_head.weight)
    for i, (layer, source) in enumerate(zip(student.model.layers, teacher.model.layers)):
        layer.input_layernorm.weight.copy_(source.input_layernorm.weight)
        layer.post_attention_layernorm.weight.copy_(source.post_attention_layernorm.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, name).weight.copy_(getattr(source.mlp, name).weight)
        if layer.mixer_type == "attn":
            _load_attention_from_qwen3(layer.self_attn, source.self_attn)
        elif i in lightning_layers:
            layer.self_attn.load_state_dict(lightning_layers[i].state_dict())
        else:
            _load_lightning_from_qwen3(layer.self_attn, source.self_attn, config.initializer_range)
    return student
