"""`HypeNetConfig`: the Hugging Face configuration of HypeNet models.

A Qwen3 configuration plus the HypeNet fields. Field names follow the published checkpoints, so their
`config.json` files load unchanged. Every field is validated when the config is built; a bad value raises a
ValueError that names the field and the value.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from transformers import PretrainedConfig

MIXER_TYPES = ("attn", "lightning-attn")
LIGHTNING_SCALES = ("1/sqrt(d)", "1/d", "1")

# Published layouts (SPEC 1.3): the layers that stay softmax attention; every other layer is Lightning.
HYPENET_2B_ATTN_LAYERS = (2, 3, 6, 8, 9, 21, 25)
HYPENET_5B_ATTN_LAYERS = (0, 1, 7, 14, 15, 22, 24, 31, 33)
HYPENET_9B_ATTN_LAYERS = (1, 2, 4, 6, 7, 10, 24, 33, 34)


def mixer_layout(num_hidden_layers: int, attn_layers) -> list[str]:
    """`mixer_types` with "attn" at the indices `attn_layers` and "lightning-attn" everywhere else."""
    attn_layers = set(attn_layers)
    bad = sorted(i for i in attn_layers if not 0 <= i < num_hidden_layers)
    if bad:
        raise ValueError(f"attn_layers {bad} are outside [0, {num_hidden_layers}) (num_hidden_layers)")
    return ["attn" if i in attn_layers else "lightning-attn" for i in range(num_hidden_layers)]


def parse_attn_logits_scaling(value: Any) -> tuple[Optional[float], float]:
    """Parse `attn_logits_scaling` into (alpha, multiplier) for the HyPE attention logits.

    - "hype <a>" (a > 1): position-dependent scaling s_t = ln(t + a) / ln(a); returns (a, 1.0).
    - a number c > 0: constant scaling, logits multiplied by c (the same as queries times c); returns (None, c).
    - None: no scaling; returns (None, 1.0).
    The logit of query t and key j is then `multiplier * s_t * (q_t . k_j) / sqrt(D)`.
    """
    if value is None:
        return None, 1.0
    if isinstance(value, bool):
        raise ValueError(f"attn_logits_scaling must be 'hype <a>' (a > 1), a number > 0 or None, got {value!r}")
    if isinstance(value, (int, float)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"attn_logits_scaling as a constant must be a finite number > 0, got {value!r}")
        return None, float(value)
    if isinstance(value, str):
        words = value.split()
        if len(words) == 2 and words[0] == "hype":
            try:
                alpha = float(words[1])
            except ValueError:
                alpha = math.nan
            if math.isfinite(alpha) and alpha > 1:
                return alpha, 1.0
            raise ValueError(f"attn_logits_scaling 'hype <a>' needs a finite number a > 1, got {value!r}")
    raise ValueError(f"attn_logits_scaling must be 'hype <a>' (a > 1), a number > 0 or None, got {value!r}")


class HypeNetConfig(PretrainedConfig):
    r"""Configuration of a HypeNet model (Qwen3 skeleton, mixers chosen per layer).

    Qwen3 fields: vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, hidden_act, rms_norm_eps, rope_theta, rope_scaling (None only),
    max_position_embeddings, tie_word_embeddings, attention_bias (False only), initializer_range.

    HypeNet fields:
        mixer_types (list[str]): per layer, "attn" (HyPE softmax attention) or "lightning-attn".
        attn_use_rope (bool): RoPE in the attention layers (False in HypeNet; True reproduces a Qwen3 teacher).
        attn_use_output_gate (bool): `o_gate` output gate in the attention layers.
        attn_logits_scaling: "hype <a>" (a > 1), a number c > 0 (constant scaling), or None
            (see `parse_attn_logits_scaling`; the parsed values are `hype_alpha` and `attn_logits_multiplier`).
        lightning_nh, lightning_nkv, lightning_head_dim: Lightning heads, KV heads (== nh) and head size.
        lightning_scale: "1/sqrt(d)" (D^-0.5), "1/d" (D^-1) or "1" (no scaling) for the Lightning output.
        lightning_use_qk_norm, lightning_use_output_norm, lightning_use_output_gate, lightning_use_rope,
        expand_kv_proj: the published architecture; only True is implemented.

    Presets: `HypeNetConfig.hypenet_2b()`, `.hypenet_5b()`, `.hypenet_9b()` or `HypeNetConfig.from_preset(name)`.
    The defaults are those of HypeNet-2B.
    """

    model_type = "hypenet"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 1_048_576
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list[int]] = None

    mixer_types: Optional[list[str]] = None
    attn_use_rope: bool = False
    attn_use_output_gate: bool = True
    attn_logits_scaling: Optional[str | float] = None
    lightning_nh: int = 16
    lightning_nkv: int = 16
    lightning_head_dim: int = 128
    lightning_scale: str = "1/sqrt(d)"
    lightning_use_qk_norm: bool = True
    lightning_use_output_norm: bool = True
    lightning_use_output_gate: bool = True
    lightning_use_rope: bool = True
    expand_kv_proj: bool = True

    def __post_init__(self, **kwargs):
        if self.mixer_types is None:
            # The default layout is HypeNet-2B's; other depths must say which layers are attention.
            if self.num_hidden_layers != 28:
                raise ValueError(f"mixer_types is required when num_hidden_layers ({self.num_hidden_layers}) "
                                 "differs from HypeNet-2B's 28 layers")
            self.mixer_types = mixer_layout(28, HYPENET_2B_ATTN_LAYERS)
        else:
            self.mixer_types = list(self.mixer_types)
        self.check_fields()
        super().__post_init__(**kwargs)

    def check_fields(self) -> None:
        """Validate every HypeNet-specific constraint; raises ValueError naming the field and the value."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "lightning_nh", "lightning_nkv", "lightning_head_dim",
                    "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("head_dim", "lightning_head_dim"):
            if getattr(self, name) % 2:
                raise ValueError(f"{name} must be even (rotate-half RoPE splits it in two), got {getattr(self, name)}")
        if len(self.mixer_types) != self.num_hidden_layers:
            raise ValueError(f"mixer_types has {len(self.mixer_types)} entries but num_hidden_layers is "
                             f"{self.num_hidden_layers}")
        for i, mixer in enumerate(self.mixer_types):
            if mixer not in MIXER_TYPES:
                raise ValueError(f"mixer_types[{i}] must be one of {MIXER_TYPES}, got {mixer!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.lightning_nkv != self.lightning_nh:
            raise ValueError(f"lightning_nkv ({self.lightning_nkv}) must equal lightning_nh ({self.lightning_nh}): "
                             "the Lightning K/V projections are expanded to every head (expand_kv_proj)")
        if self.lightning_scale not in LIGHTNING_SCALES:
            raise ValueError(f"lightning_scale must be one of {LIGHTNING_SCALES}, got {self.lightning_scale!r}")
        parse_attn_logits_scaling(self.attn_logits_scaling)
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps must be a number > 0, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a number > 0, got {self.rope_theta!r}")
        if self.rope_scaling not in (None, {}) and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) \
                != "default":
            raise ValueError(f"rope_scaling: only plain RoPE (None) is implemented, got {self.rope_scaling!r}")
        if self.attention_bias:
            raise ValueError("attention_bias=True is not implemented: HypeNet projections have no biases")
        for name in ("lightning_use_qk_norm", "lightning_use_output_norm", "lightning_use_output_gate",
                     "lightning_use_rope", "expand_kv_proj"):
            if getattr(self, name) is not True:
                raise ValueError(f"{name}={getattr(self, name)!r} is not implemented: HypeNet uses True")

    @property
    def hype_alpha(self) -> Optional[float]:
        """The HyPE constant a of `attn_logits_scaling = "hype <a>"`, else None."""
        return parse_attn_logits_scaling(self.attn_logits_scaling)[0]

    @property
    def attn_logits_multiplier(self) -> float:
        """The constant c of `attn_logits_scaling = c`, else 1.0."""
        return parse_attn_logits_scaling(self.attn_logits_scaling)[1]

    @property
    def lightning_output_scale(self) -> float:
        """The scale of the Lightning output `o_t = scale * q_t S_t` from `lightning_scale`."""
        return {"1/sqrt(d)": self.lightning_head_dim ** -0.5, "1/d": 1.0 / self.lightning_head_dim,
                "1": 1.0}[self.lightning_scale]

    @property
    def attn_layer_indices(self) -> list[int]:
        """Indices of the "attn" layers."""
        return [i for i, mixer in enumerate(self.mixer_types) if mixer == "attn"]

    @classmethod
    def hypenet_2b(cls, **overrides) -> "HypeNetConfig":
        """HypeNet-2B (from Qwen3-1.7B): 28 layers, hidden 2048, 7 attention layers, HyPE a = 500."""
        fields = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                      num_key_value_heads=8, lightning_nh=16, lightning_nkv=16, tie_word_embeddings=True,
                      mixer_types=mixer_layout(28, HYPENET_2B_ATTN_LAYERS), attn_logits_scaling="hype 500")
        return cls(**{**fields, **overrides})

    @classmethod
    def hypenet_5b(cls, **overrides) -> "HypeNetConfig":
        """HypeNet-5B (from Qwen3-4B): 36 layers, hidden 2560, 9 attention layers, HyPE a = 600."""
        fields = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                      num_key_value_heads=8, lightning_nh=32, lightning_nkv=32, tie_word_embeddings=True,
                      mixer_types=mixer_layout(36, HYPENET_5B_ATTN_LAYERS), attn_logits_scaling="hype 600")
        return cls(**{**fields, **overrides})

    @classmethod
    def hypenet_9b(cls, **overrides) -> "HypeNetConfig":
        """HypeNet-9B (from Qwen3-8B): 36 layers, hidden 4096, 9 attention layers, HyPE a = 900."""
        fields = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                      num_key_value_heads=8, lightning_nh=32, lightning_nkv=32, tie_word_embeddings=False,
                      mixer_types=mixer_layout(36, HYPENET_9B_ATTN_LAYERS), attn_logits_scaling="hype 900")
        return cls(**{**fields, **overrides})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "HypeNetConfig":
        """`name` in {"hypenet-2b", "hypenet-5b", "hypenet-9b"} (case-insensitive); `overrides` replace fields."""
        presets = {"hypenet-2b": cls.hypenet_2b, "hypenet-5b": cls.hypenet_5b, "hypenet-9b": cls.hypenet_9b}
        key = name.lower().replace("_", "-")
        if key not in presets:
            raise ValueError(f"name must be one of {sorted(presets)}, got {name!r}")
        return presets[key](**overrides)
