"""The references against independent formulations: chunked vs step-by-step recurrence, packed vs separate
sequences, decode vs the last rows of the full op, paged vs contiguous caches, s_t against SPEC numbers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

from hypenet.ops.reference import (hype_attn_decode_ref, hype_attn_ref, hype_logit_scale, lightning_attn_recurrent_ref,
                                   lightning_attn_ref, lightning_attn_step_ref, qk_norm_rope_ref, rmsnorm_gate_ref)
from tests.strategies import cu_seqlens, log_decays, randn

F64 = torch.float64


@given(B=st.integers(1, 2), T=st.integers(1, 150), H=st.integers(1, 3), K=st.sampled_from([4, 8]),
       V=st.sampled_from([4, 6]), strength=st.sampled_from([1e-3, 0.5, 8.0]), with_state=st.booleans(),
       seed=st.integers(0, 2**16))
def test_lightning_chunked_equals_recurrence(B, T, H, K, V, strength, with_state, seed):
    q, k = randn((B, T, H, K), F64, "cpu", seed), randn((B, T, H, K), F64, "cpu", seed + 1)
    v = randn((B, T, H, V), F64, "cpu", seed + 2)
    g = log_decays(H, strength, seed).double()
    h0 = randn((B, H, K, V), F64, "cpu", seed + 3) if with_state else None
    o, s = lightning_attn_ref(q, k, v, g, 0.3, h0, True)
    o_r, s_r = lightning_attn_recurrent_ref(q, k, v, g, 0.3, h0, True)
    torch.testing.assert_close(o, o_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_r, rtol=1e-10, atol=1e-10)


def test_lightning_matches_decay_mask_formula():
    """o_t = scale * sum_{j<=t} gamma^(t-j) (q_t . k_j) v_j (SPEC 1.1 step 5)."""
    T, H, D = 40, 2, 8
    q, k, v = (randn((1, T, H, D), F64, "cpu", s) for s in range(3))
    g = log_decays(H, 1.0, 0).double()
    t = torch.arange(T, dtype=F64)
    mask = torch.exp(g[:, None, None] * (t[:, None] - t[None, :])) * (t[:, None] >= t[None, :])  # (H, T, T)
    expected = torch.einsum("hts,shd->thd", torch.einsum("thd,shd->hts", q[0], k[0]) * mask, v[0]) * D ** -0.5
    torch.testing.assert_close(lightning_attn_ref(q, k, v, g)[0][0], expected)


@given(packing=cu_seqlens(total_max=90), with_state=st.booleans(), seed=st.integers(0, 2**16))
def test_lightning_packed_equals_separate(packing, with_state, seed):
    offsets, T = packing
    H, D = 2, 4
    q, k, v = (randn((1, T, H, D), F64, "cpu", seed + i) for i in range(3))
    g = log_decays(H, 0.3, seed).double()
    N = len(offsets) - 1
    h0 = randn((N, H, D, D), F64, "cpu", seed + 5) if with_state else None
    o, s = lightning_attn_ref(q, k, v, g, None, h0, True, torch.tensor(offsets))
    for n in range(N):
        a, b = offsets[n], offsets[n + 1]
        o_n, s_n = lightning_attn_ref(q[:, a:b], k[:, a:b], v[:, a:b], g, None,
                                      None if h0 is None else h0[n:n + 1], True)
        torch.testing.assert_close(o[:, a:b], o_n)
        torch.testing.assert_close(s[n:n + 1], s_n)


@given(T_prefix=st.integers(1, 70), T_step=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_lightning_step_continues_the_full_op(T_prefix, T_step, seed):
    B, H, D = 3, 2, 4
    T = T_prefix + T_step
    q, k, v = (randn((B, T, H, D), F64, "cpu", seed + i) for i in range(3))
    g = log_decays(H, 2.0, seed).double()
    o_full, s_full = lightning_attn_ref(q, k, v, g, None, None, True)
    _, s_prefix = lightning_attn_ref(q[:, :T_prefix], k[:, :T_prefix], v[:, :T_prefix], g, None, None, True)
    pool = torch.zeros(B + 2, H, D, D, dtype=F64)
    slots = torch.tensor([4, 0, 2])
    pool[slots] = s_prefix
    untouched = pool[[1, 3]].clone()
    o_step = lightning_attn_step_ref(q[:, T_prefix:], k[:, T_prefix:], v[:, T_prefix:], g, pool, None, slots)
    torch.testing.assert_close(o_step, o_full[:, T_prefix:])
    torch.testing.assert_close(pool[slots], s_full)
    torch.testing.assert_close(pool[[1, 3]], untouched)


def test_hype_logit_scale_matches_spec():
    s = hype_logit_scale(torch.tensor([0, 4096, 16384, 131072, 2**20]), 500.0)
    torch.testing.assert_close(s, torch.tensor([1.0, 1.357, 1.566, 1.897, 2.231]), atol=6e-4, rtol=0)
    assert torch.equal(hype_logit_scale(torch.tensor([3, 7]), None), torch.ones(2))


def _naive_attention(q, k, v, positions, alpha, scale):
    """One query at a time, written out: the definition of SPEC 1.2."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    out = torch.empty_like(q)
    for i in range(T):
        t = positions[i]
        s_t = 1.0 if alpha is None else math.log(t + alpha) / math.log(alpha)
        for h in range(Hq):
            logits = (k[: t + 1, h // group] @ q[i, h]) * scale * s_t
            out[i, h] = torch.softmax(logits, 0) @ v[: t + 1, h // group]
    return out


@given(T=st.integers(1, 9), extra=st.integers(0, 7), group=st.sampled_from([1, 2, 4]),
       alpha=st.sampled_from([None, 2.0, 500.0]), seed=st.integers(0, 2**16))
def test_hype_attn_ref_matches_definition(T, extra, group, alpha, seed):
    S, Hkv, D = T + extra, 2, 4
    q = randn((1, T, Hkv * group, D), F64, "cpu", seed)
    k, v = randn((1, S, Hkv, D), F64, "cpu", seed + 1), randn((1, S, Hkv, D), F64, "cpu", seed + 2)
    expected = _naive_attention(q[0], k[0], v[0], list(range(S - T, S)), alpha, D ** -0.5)
    torch.testing.assert_close(hype_attn_ref(q, k, v, alpha)[0], expected)


@given(packing=cu_seqlens(total_max=30), seed=st.integers(0, 2**16))
def test_hype_attn_packed_positions_are_per_sequence(packing, seed):
    offsets_k, S = packing
    # every sequence gets a random number of queries (its last positions)
    q_lens = [max(1, (b - a) // 2) for a, b in zip(offsets_k, offsets_k[1:])]
    offsets_q = [0]
    for n in q_lens:
        offsets_q.append(offsets_q[-1] + n)
    T, Hq, Hkv, D = offsets_q[-1], 4, 2, 4
    q = randn((1, T, Hq, D), F64, "cpu", seed)
    k, v = randn((1, S, Hkv, D), F64, "cpu", seed + 1), randn((1, S, Hkv, D), F64, "cpu", seed + 2)
    o = hype_attn_ref(q, k, v, 3.0, None, True, torch.tensor(offsets_q), torch.tensor(offsets_k))
    for n in range(len(q_lens)):
        qa, qb, ka, kb = offsets_q[n], offsets_q[n + 1], offsets_k[n], offsets_k[n + 1]
        torch.testing.assert_close(o[:, qa:qb], hype_attn_ref(q[:, qa:qb], k[:, ka:kb], v[:, ka:kb], 3.0))


@given(Tq=st.integers(1, 3), block_size=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**16))
def test_hype_decode_matches_full_and_paged_matches_contiguous(Tq, block_size, seed):
    B, S_max, Hq, Hkv, D = 3, 16, 4, 2, 4
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(Tq, S_max + 1, (B,), generator=g)
    q = randn((B, Tq, Hq, D), F64, "cpu", seed)
    k_cache, v_cache = randn((B, S_max, Hkv, D), F64, "cpu", seed + 1), randn((B, S_max, Hkv, D), F64, "cpu", seed + 2)
    o = hype_attn_decode_ref(q, k_cache, v_cache, lengths, alpha=500.0)
    for b in range(B):
        L = int(lengths[b])
        full = hype_attn_ref(q[b:b + 1], k_cache[b:b + 1, :L], v_cache[b:b + 1, :L], 500.0)
        torch.testing.assert_close(o[b:b + 1], full)
    # the same caches cut into shuffled blocks
    blocks_per_row = S_max // block_size
    perm = torch.randperm(B * blocks_per_row, generator=g)
    k_paged = torch.empty(B * blocks_per_row, block_size, Hkv, D, dtype=F64)
    v_paged = torch.empty_like(k_paged)
    k_paged[perm] = k_cache.reshape(-1, block_size, Hkv, D)
    v_paged[perm] = v_cache.reshape(-1, block_size, Hkv, D)
    table = perm.view(B, blocks_per_row).to(torch.int32)
    o_paged = hype_attn_decode_ref(q, k_paged, v_paged, lengths, alpha=500.0, block_table=table)
    torch.testing.assert_close(o_paged, o)


def test_qk_norm_rope_matches_transformers_qwen3():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    B, T, H, D = 2, 5, 3, 8
    q, k = randn((B, T, H, D), F64, "cpu", 0), randn((B, T, 1, D), F64, "cpu", 1)
    norm_q, norm_k = Qwen3RMSNorm(D, eps=1e-6).double(), Qwen3RMSNorm(D, eps=1e-6).double()
    with torch.no_grad():
        norm_q.weight.copy_(randn((D,), F64, "cpu", 2))
        norm_k.weight.copy_(randn((D,), F64, "cpu", 3))
    angles = randn((B, T, D // 2), F64, "cpu", 4)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    eq, ek = apply_rotary_pos_emb(norm_q(q).transpose(1, 2), norm_k(k).transpose(1, 2), cos, sin)
    gq, gk = qk_norm_rope_ref(q, k, norm_q.weight, norm_k.weight, cos, sin)
    torch.testing.assert_close(gq, eq.transpose(1, 2))
    torch.testing.assert_close(gk, ek.transpose(1, 2))


def test_rmsnorm_gate_matches_formula():
    x, z, w = randn((3, 7, 16), F64, "cpu", 0), randn((3, 7, 16), F64, "cpu", 1), randn((16,), F64, "cpu", 2)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w * torch.sigmoid(z)
    torch.testing.assert_close(rmsnorm_gate_ref(x, z, w), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_references_return_the_input_dtype(dtype):
    q = randn((1, 5, 2, 4), dtype, "cpu", 0)
    g = log_decays(2, 1.0, 0)
    o, s = lightning_attn_ref(q, q, q, g, None, None, True)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert hype_attn_ref(q, q, q).dtype == dtype
