"""HypeNetConfig: published presets, validation with clear errors, parsing, and save / load."""

from __future__ import annotations

import math

import pytest
from transformers import AutoConfig

import hypenet.modeling  # noqa: F401  (registers the Auto classes)
from hypenet.config import HypeNetConfig, mixer_layout, parse_attn_logits_scaling
from tests.models.tiny import tiny_config

PRESETS = {
    # name: (layers, hidden, ffn, heads, kv heads, lightning heads, attention layers, a, tied)
    "hypenet-2b": (28, 2048, 6144, 16, 8, 16, [2, 3, 6, 8, 9, 21, 25], 500.0, True),
    "hypenet-5b": (36, 2560, 9728, 32, 8, 32, [0, 1, 7, 14, 15, 22, 24, 31, 33], 600.0, True),
    "hypenet-9b": (36, 4096, 12288, 32, 8, 32, [1, 2, 4, 6, 7, 10, 24, 33, 34], 900.0, False),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_the_published_layouts(name):
    layers, hidden, ffn, heads, kv_heads, lightning_heads, attn_layers, alpha, tied = PRESETS[name]
    config = HypeNetConfig.from_preset(name)
    assert config == getattr(HypeNetConfig, name.replace("-", "_"))()
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (layers, hidden, ffn)
    assert (config.num_attention_heads, config.num_key_value_heads) == (heads, kv_heads)
    assert config.lightning_nh == config.lightning_nkv == lightning_heads
    assert config.attn_layer_indices == attn_layers
    assert all(config.mixer_types[i] == "lightning-attn" for i in range(layers) if i not in attn_layers)
    assert config.hype_alpha == alpha and config.attn_logits_multiplier == 1.0
    assert config.tie_word_embeddings is tied
    assert (config.vocab_size, config.head_dim, config.lightning_head_dim) == (151936, 128, 128)
    assert config.rope_theta == 1e6 and config.max_position_embeddings == 1_048_576
    assert len(config.attn_layer_indices) == math.floor(layers / 4)


def test_preset_overrides_and_unknown_name():
    config = HypeNetConfig.hypenet_2b(num_hidden_layers=4, mixer_types=mixer_layout(4, [1]))
    assert config.mixer_types == ["lightning-attn", "attn", "lightning-attn", "lightning-attn"]
    with pytest.raises(ValueError, match="hypenet-3b"):
        HypeNetConfig.from_preset("hypenet-3b")


def test_default_is_hypenet_2b_layout():
    assert HypeNetConfig().mixer_types == HypeNetConfig.hypenet_2b().mixer_types


@pytest.mark.parametrize("fields, message", [
    (dict(mixer_types=["attn"] * 3), "mixer_types has 3 entries but num_hidden_layers is 4"),
    (dict(mixer_types=["attn", "mamba", "attn", "attn"]), r"mixer_types\[1\].*'mamba'"),
    (dict(num_key_value_heads=3), r"num_attention_heads \(4\).*num_key_value_heads \(3\)"),
    (dict(attn_logits_scaling="hype 0.5"), "attn_logits_scaling.*'hype 0.5'"),
    (dict(attn_logits_scaling="hype"), "attn_logits_scaling.*'hype'"),
    (dict(attn_logits_scaling="rope"), "attn_logits_scaling.*'rope'"),
    (dict(attn_logits_scaling=-2.0), "attn_logits_scaling.*-2.0"),
    (dict(attn_logits_scaling=True), "attn_logits_scaling.*True"),
    (dict(lightning_scale="1/sqrt(D)"), r"lightning_scale.*'1/sqrt\(D\)'"),
    (dict(lightning_nkv=2), r"lightning_nkv \(2\).*lightning_nh \(4\)"),
    (dict(head_dim=7), "head_dim must be even.*7"),
    (dict(hidden_size=0), "hidden_size must be a positive integer, got 0"),
    (dict(lightning_use_rope=False), "lightning_use_rope=False"),
    (dict(expand_kv_proj=False), "expand_kv_proj=False"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(num_hidden_layers=3, mixer_types=None), r"mixer_types is required.*num_hidden_layers \(3\)"),
])
def test_bad_configs_raise_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_mixer_layout_rejects_out_of_range_layers():
    with pytest.raises(ValueError, match=r"attn_layers \[4\]"):
        mixer_layout(4, [1, 4])


def test_parse_attn_logits_scaling():
    assert parse_attn_logits_scaling("hype 500") == (500.0, 1.0)
    assert parse_attn_logits_scaling("hype 1.5") == (1.5, 1.0)
    assert parse_attn_logits_scaling(1.5) == (None, 1.5)
    assert parse_attn_logits_scaling(2) == (None, 2.0)
    assert parse_attn_logits_scaling(None) == (None, 1.0)


@pytest.mark.parametrize("scale, expected", [("1/sqrt(d)", 8 ** -0.5), ("1/d", 1 / 8), ("1", 1.0)])
def test_lightning_output_scale(scale, expected):
    assert tiny_config(lightning_scale=scale).lightning_output_scale == expected


def test_save_and_load_through_auto_config(tmp_path):
    config = tiny_config(attn_logits_scaling=1.25, attn_use_output_gate=False)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, HypeNetConfig)
    assert loaded.model_type == "hypenet"
    for name in ("mixer_types", "attn_logits_scaling", "attn_use_output_gate", "lightning_nh", "head_dim",
                 "rope_theta", "lightning_scale", "attn_use_rope"):
        assert getattr(loaded, name) == getattr(config, name), name


def test_loading_an_invalid_config_file_raises(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"hype 3"', '"hype -3"'))
    with pytest.raises(ValueError, match="attn_logits_scaling"):
        AutoConfig.from_pretrained(tmp_path)
