"""Tiny HypeNet / Qwen3 models for the model tests (CPU, reference backend)."""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from hypenet.config import HypeNetConfig
from hypenet.modeling import HypeNetForCausalLM

HYBRID = ["lightning-attn", "attn", "lightning-attn", "attn"]


def tiny_config(**overrides) -> HypeNetConfig:
    """4 layers (Lightning, attention, Lightning, attention), d = 32, GQA 4/2, head dims 8, HyPE a = 3 (a small a
    makes s_t vary a lot over a few tokens)."""
    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, lightning_nh=4, lightning_nkv=4, lightning_head_dim=8,
                  mixer_types=HYBRID, attn_logits_scaling="hype 3", rope_theta=10000.0, initializer_range=0.2,
                  pad_token_id=0, tie_word_embeddings=False)
    return HypeNetConfig(**{**fields, **overrides})


def perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Give every norm weight a random value (ones would hide a norm weight that is never applied)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> HypeNetForCausalLM:
    torch.manual_seed(seed)
    model = HypeNetForCausalLM(tiny_config(**overrides)).to(dtype).eval()
    perturb_norms(model, seed)
    return model


def tiny_qwen3(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Qwen3ForCausalLM:
    """A random 3-layer Qwen3 with GQA (4 heads, 2 KV heads)."""
    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=False,
                  initializer_range=0.2, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**{**fields, **overrides})).to(dtype).eval()
    perturb_norms(model, seed)
    return model


def left_padded(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, max_len] with the prompts right-aligned."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    return ids, mask


def random_prompts(lengths: list[int], vocab: int = 61, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
