"""The mixers against plain-PyTorch transcriptions of SPEC 1.1 (Lightning) and SPEC 1.2 (HyPE attention), in fp64."""

from __future__ import annotations

import math

import pytest
import torch

from hypenet.layers import HypeAttention, HypeNetRMSNorm, LightningAttention, alibi_slopes
from tests.models.tiny import perturb_norms, tiny_config

F64 = torch.float64


def test_alibi_slopes_match_the_spec_decays():
    gammas16 = [math.exp(-m) for m in alibi_slopes(16)]
    assert round(gammas16[0], 4) == 0.4931 and round(gammas16[-1], 4) == 0.9961
    gammas32 = [math.exp(-m) for m in alibi_slopes(32)]
    assert round(gammas32[0], 4) == 0.4313 and round(gammas32[-1], 4) == 0.9961
    assert alibi_slopes(8) == [2.0 ** (-h) for h in range(1, 9)]


def test_alibi_slopes_for_a_head_count_that_is_not_a_power_of_two():
    # P = 8: the 8 slopes of 8 heads, then every other slope of the 16-head list, the first 4 of them.
    expected = [2.0 ** (-h) for h in range(1, 9)] + [2.0 ** (-h / 2) for h in (1, 3, 5, 7)]
    assert alibi_slopes(12) == pytest.approx(expected, rel=1e-15)
    assert all(0 < m <= 1 for m in alibi_slopes(12))


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_alibi_slopes_reject_bad_head_counts(bad):
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(bad)


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_rmsnorm_float32_path_matches_qwen3_forward_and_gradients(device):
    # fp32 input and weight take torch's fused rms_norm; it must compute Qwen3's function and its gradients.
    torch.manual_seed(0)
    norm = HypeNetRMSNorm(96, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 7, 96, device=device) * 4).requires_grad_()
    grad_out = torch.randn(3, 7, 96, device=device)
    out = norm(x)
    gx, gw = torch.autograd.grad(out, (x, norm.weight), grad_out)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    ref = _rms(x64, w64, 1e-6)
    rx, rw = torch.autograd.grad(ref, (x64, w64), grad_out.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_rmsnorm_bf16_input_rounds_like_qwen3(device):
    # bf16 input: normalised in fp32, rounded to bf16, then times the weight (Qwen3's two roundings).
    torch.manual_seed(1)
    norm = HypeNetRMSNorm(64).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 64, device=device).to(torch.bfloat16)
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)


def _rope(x, positions, theta):
    """Rotate-half RoPE of x [B, T, H, D] at positions [B or 1, T]."""
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=F64) / D)
    angles = positions.to(F64)[..., None] * inv_freq
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, :, None], torch.cat([angles.sin()] * 2, -1)[:, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def lightning_by_the_spec(layer: LightningAttention, x, positions):
    """SPEC 1.1 step by step, recurrent form, fp64."""
    B, T, _ = x.shape
    H, D, eps = layer.num_heads, layer.head_dim, layer.eps
    q, k, v, z = (x @ getattr(layer, f"{n}_proj").weight.T for n in "qkvz")
    q, k, v = (t.view(B, T, H, D) for t in (q, k, v))
    q = _rope(_rms(q, layer.q_norm.weight, eps), positions, layer.rope_theta)
    k = _rope(_rms(k, layer.k_norm.weight, eps), positions, layer.rope_theta)
    # The decays are float32 constants (the op contract), so round the slopes to float32 first.
    slopes = torch.tensor(alibi_slopes(H), dtype=torch.float32).to(F64)
    gamma = torch.exp(-slopes)[None, :, None, None]
    state = torch.zeros(B, H, D, D, dtype=F64)
    outputs = []
    for t in range(T):
        state = gamma * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(layer.scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    o = torch.stack(outputs, 1).reshape(B, T, H * D)
    return (_rms(o, layer.o_norm.weight, eps) * torch.sigmoid(z)) @ layer.o_proj.weight.T


def hype_attention_by_the_spec(layer: HypeAttention, x, positions):
    """SPEC 1.2 directly: softmax(c * s_t * q.k / sqrt(D)) with GQA, causal, then the gate and o_proj."""
    B, T, _ = x.shape
    Hq, Hkv, D, eps = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.eps
    q = _rms((x @ layer.q_proj.weight.T).view(B, T, Hq, D), layer.q_norm.weight, eps)
    k = _rms((x @ layer.k_proj.weight.T).view(B, T, Hkv, D), layer.k_norm.weight, eps)
    v = (x @ layer.v_proj.weight.T).view(B, T, Hkv, D)
    if layer.use_rope:
        q, k = _rope(q, positions, layer.rope_theta), _rope(k, positions, layer.rope_theta)
    k, v = k.repeat_interleave(Hq // Hkv, 2), v.repeat_interleave(Hq // Hkv, 2)
    scaling = layer.config.attn_logits_scaling
    t = torch.arange(T, dtype=F64)
    if isinstance(scaling, str):
        a = float(scaling.split()[1])
        s = torch.log(t + a) / math.log(a)
    else:
        s = torch.full((T,), 1.0 if scaling is None else float(scaling), dtype=F64)
    logits = torch.einsum("bthd,bshd->bhts", q, k) * s[:, None] / math.sqrt(D)
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", logits.softmax(-1), v).reshape(B, T, Hq * D)
    if layer.o_gate is not None:
        o = o * torch.sigmoid(x @ layer.o_gate.weight.T)
    return o @ layer.o_proj.weight.T


def _layer(cls, seed, **overrides):
    torch.manual_seed(seed)
    layer = cls(tiny_config(**overrides), layer_idx=0).to(F64)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    perturb_norms(layer, seed)
    return layer


@pytest.mark.parametrize("scale", ["1/sqrt(d)", "1/d", "1"])
def test_lightning_layer_follows_the_spec(scale):
    layer = _layer(LightningAttention, 0, lightning_scale=scale)
    x = torch.randn(2, 11, 32, dtype=F64)
    positions = torch.arange(3, 14)[None]  # not starting at 0: RoPE must use the given positions
    torch.testing.assert_close(layer(x, positions), lightning_by_the_spec(layer, x, positions), rtol=1e-10,
                               atol=1e-10)


def test_lightning_layer_defaults_to_positions_from_zero():
    layer = _layer(LightningAttention, 1)
    x = torch.randn(1, 6, 32, dtype=F64)
    torch.testing.assert_close(layer(x), lightning_by_the_spec(layer, x, torch.arange(6)[None]))


def test_lightning_log_decay_is_fp32_constant_on_any_model_dtype():
    layer = _layer(LightningAttention, 2).to(torch.bfloat16)
    decay = layer.log_decay(torch.device("cpu"))
    assert decay.dtype == torch.float32
    assert decay is layer.log_decay(torch.device("cpu"))
    torch.testing.assert_close(decay, -torch.tensor(alibi_slopes(4), dtype=torch.float32))


@pytest.mark.parametrize("scaling", ["hype 3", 1.75, None])
@pytest.mark.parametrize("gate", [True, False])
def test_hype_attention_layer_follows_the_spec(scaling, gate):
    layer = _layer(HypeAttention, 3, attn_logits_scaling=scaling, attn_use_output_gate=gate)
    x = torch.randn(2, 9, 32, dtype=F64)
    expected = hype_attention_by_the_spec(layer, x, None)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_hype_attention_with_rope_follows_the_spec():
    layer = _layer(HypeAttention, 4, attn_use_rope=True, attn_logits_scaling=None)
    x = torch.randn(2, 7, 32, dtype=F64)
    positions = torch.arange(7)[None]
    torch.testing.assert_close(layer(x, positions), hype_attention_by_the_spec(layer, x, positions))


def test_hype_attention_reads_the_scaling_at_call_time():
    layer = _layer(HypeAttention, 5, attn_logits_scaling=None)
    x = torch.randn(1, 8, 32, dtype=F64)
    before = layer(x)
    layer.config.attn_logits_scaling = "hype 2"  # what HALO does after choosing a
    after = layer(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, hype_attention_by_the_spec(layer, x, None))


@pytest.mark.parametrize("cls", [LightningAttention, HypeAttention])
def test_stand_alone_layer_with_padding_equals_each_row_alone(cls):
    layer = _layer(cls, 6)
    lengths, T = [5, 8, 3], 8
    rows = [torch.randn(1, n, 32, dtype=F64) for n in lengths]
    x = torch.zeros(3, T, 32, dtype=F64)
    mask = torch.zeros(3, T, dtype=torch.long)
    x[0, T - 5:], mask[0, T - 5:] = rows[0][0], 1  # left padding
    x[1], mask[1] = rows[1][0], 1  # none
    x[2, :3], mask[2, :3] = rows[2][0], 1  # right padding
    out = layer(x, attention_mask=mask)
    torch.testing.assert_close(out[0, T - 5:], layer(rows[0])[0])
    torch.testing.assert_close(out[1], layer(rows[1])[0])
    torch.testing.assert_close(out[2, :3], layer(rows[2])[0])
    assert torch.all(out[mask == 0] == 0)
