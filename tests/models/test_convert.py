"""Qwen3 -> HypeNet weight transfer (SPEC 2 step 0)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hypenet.convert import convert_qwen3, expand_kv_heads, hypenet_config_from_qwen3, lightning_from_qwen3_attention
from tests.models.tiny import tiny_qwen3

LAYOUT = ["lightning-attn", "attn", "lightning-attn"]


def test_expand_kv_heads_gives_head_i_the_kv_head_i_over_g():
    Hkv, H, D, d = 2, 6, 3, 5
    weight = torch.randn(Hkv * D, d)
    expanded = expand_kv_heads(weight, Hkv, H)
    assert expanded.shape == (H * D, d)
    for head in range(H):
        kv = head // (H // Hkv)
        assert torch.equal(expanded[head * D:(head + 1) * D], weight[kv * D:(kv + 1) * D])
    with pytest.raises(ValueError, match=r"num_heads \(5\).*num_kv_heads \(2\)"):
        expand_kv_heads(weight, 2, 5)


def test_lightning_from_qwen3_attention_transfers_the_weights():
    teacher = tiny_qwen3(dtype=torch.float64)
    config = hypenet_config_from_qwen3(teacher.config, LAYOUT)
    source = teacher.model.layers[2].self_attn
    layer = lightning_from_qwen3_attention(source, config, 2)
    assert layer.layer_idx == 2 and layer.q_proj.weight.dtype == torch.float64
    for name in ("q_proj", "o_proj", "q_norm", "k_norm"):
        assert torch.equal(getattr(layer, name).weight, getattr(source, name).weight), name
    for name in ("k_proj", "v_proj"):
        assert torch.equal(getattr(layer, name).weight, expand_kv_heads(getattr(source, name).weight, 2, 4)), name
    assert torch.equal(layer.o_norm.weight, torch.ones(32, dtype=torch.float64))
    z = layer.z_proj.weight.detach()
    assert z.shape == (32, 32) and 0.1 < float(z.std()) < 0.3  # N(0, initializer_range = 0.2)
    assert layer(torch.randn(2, 5, 32, dtype=torch.float64)).shape == (2, 5, 32)


def test_lightning_transfer_rejects_a_mismatched_config():
    teacher = tiny_qwen3()
    config = hypenet_config_from_qwen3(teacher.config, LAYOUT, lightning_nh=2, lightning_nkv=2)
    with pytest.raises(ValueError, match="lightning_nh=2"):
        lightning_from_qwen3_attention(teacher.model.layers[0].self_attn, config, 0)


def test_config_from_qwen3_keeps_the_teacher_sizes():
    teacher = tiny_qwen3()
    config = hypenet_config_from_qwen3(teacher.config, LAYOUT, attn_logits_scaling="hype 500")
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == \
        (32, 4, 2, 8)
    assert (config.lightning_nh, config.lightning_head_dim, config.rope_theta) == (4, 8, 10000.0)
    assert config.mixer_types == LAYOUT and config.hype_alpha == 500.0


def test_convert_qwen3_builds_the_hybrid_student(tmp_path):
    teacher = tiny_qwen3(tie_word_embeddings=True)
    teacher.save_pretrained(tmp_path)
    from_object = convert_qwen3(teacher, LAYOUT)
    from_directory = convert_qwen3(str(tmp_path), LAYOUT)
    assert from_object.config.tie_word_embeddings
    for student in (from_object, from_directory):
        layers = student.model.layers
        assert [layer.mixer_type for layer in layers] == LAYOUT
        assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
        assert torch.equal(layers[2].mlp.down_proj.weight, teacher.model.layers[2].mlp.down_proj.weight)
        assert torch.equal(layers[0].self_attn.k_proj.weight,
                           expand_kv_heads(teacher.model.layers[0].self_attn.k_proj.weight, 2, 4))
        attn, source = layers[1].self_attn, teacher.model.layers[1].self_attn
        # The new gate starts neutral: zero gate weights (sigmoid = 1/2) and a doubled o_proj.
        assert torch.equal(attn.o_gate.weight, torch.zeros_like(attn.o_gate.weight))
        assert torch.equal(attn.o_proj.weight, 2 * source.o_proj.weight)
        assert torch.equal(attn.k_norm.weight, source.k_norm.weight)
    ids = torch.randint(1, 61, (1, 6))
    with torch.no_grad():
        assert torch.isfinite(from_object(ids).logits).all()


def test_convert_qwen3_uses_given_lightning_layers():
    teacher = tiny_qwen3()
    config = hypenet_config_from_qwen3(teacher.config, LAYOUT)
    trained = lightning_from_qwen3_attention(teacher.model.layers[2].self_attn, config, 2)
    with torch.no_grad():
        trained.z_proj.weight.fill_(0.5)
    student = convert_qwen3(teacher, LAYOUT, lightning_layers={2: trained})
    assert torch.equal(student.model.layers[2].self_attn.z_proj.weight, trained.z_proj.weight)
    with pytest.raises(ValueError, match=r"lightning_layers has layers \[1\]"):
        convert_qwen3(teacher, LAYOUT, lightning_layers={1: trained})


def test_convert_qwen3_rejects_other_teachers():
    with pytest.raises(ValueError, match="Qwen3"):
        convert_qwen3(nn.Linear(2, 2), LAYOUT)
    with pytest.raises(ValueError, match="local checkpoint directory"):
        convert_qwen3("/nonexistent/qwen3", LAYOUT)
