"""Fused normalisation helpers of the HypeNet layers (Triton kernels + launchers).

- rmsnorm_gate: y = RMSNorm(x) * weight * sigmoid(z) over the last dim C (the Lightning layer's output norm
  and gate), x, z [..., C], weight [C].
- qk_norm_rope: per-head RMSNorm over D with one weight [D] shared by the heads, then rotate-half RoPE with
  tables cos, sin [B or 1, T, D]; q [B, T, Hq, D], k [B, T, Hk, D].

Everything is computed in float32 and rounded once to the input dtype, as the references do; the forward passes
also return rstd = 1 / sqrt(mean(x^2) + eps) (float32, one per normalised vector) for the backward passes.
The weight gradients are reduced in two steps: a fixed number of persistent programs (from the SM count) each
sum their rows into a float32 partial, and torch sums the partials.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .device import sm_count

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# One normalised row lives in registers: cap its length.
MAX_CHANNELS = 16384
# Rows of one tile: about this many elements per tile.
TILE_ELEMENTS = 4096
PROGRAMS_PER_SM = 4


def unsupported_reason(*inputs: torch.Tensor) -> Optional[str]:
    """Why the kernels cannot run these inputs, or None: (x, z, weight) of rmsnorm_gate or
    (q, k, q_weight, k_weight, cos, sin) of qk_norm_rope."""
    first = inputs[0]
    if first.device.type != "cuda" and not (first.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"the Triton norm kernels need CUDA tensors (or TRITON_INTERPRET=1), got {first.device}"
    for t in inputs:
        if t.dtype not in SUPPORTED_DTYPES:
            return f"the Triton norm kernels support bf16, fp16 and fp32 tensors, got {t.dtype}"
    if first.shape[-1] > MAX_CHANNELS:
        return f"the Triton norm kernels normalise at most {MAX_CHANNELS} channels, got {first.shape[-1]}"
    return None


def _rows(C: int) -> int:
    return max(1, min(64, TILE_ELEMENTS // triton.next_power_of_2(C)))


@triton.jit
def rmsnorm_gate_fwd_kernel_main(x, z, weight, y, rstd, R, C, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: BLOCK_R rows of the contiguous [R, C] inputs."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    xf = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    zf = tl.load(z + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight + cols, mask=cols < C, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / C + eps)
    out = xf * r[:, None] * w[None, :] * tl.sigmoid(zf)
    tl.store(y + offs, out.to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, r, mask=rows < R)


@triton.jit
def rmsnorm_gate_bwd_kernel_main(x, z, weight, rstd, dy, dx, dz, dweight_part, R, C, tiles_per_program,
                                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Persistent program p: tiles p, p + P, ...; writes its partial weight gradient to dweight_part[p]."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    w = tl.load(weight + cols, mask=cols < C, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(tiles_per_program):
        rows = (pid + i * num_programs) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        mask = row_ok[:, None] & (cols[None, :] < C)
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        xf = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
        zf = tl.load(z + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dy + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(rstd + rows, mask=row_ok, other=0.0)
        n = xf * r[:, None]
        gate = tl.sigmoid(zf)
        dw += tl.sum(g * n * gate, 0)
        dz_tile = g * n * w[None, :] * gate * (1.0 - gate)
        dn = g * w[None, :] * gate
        # d/dx of x * rstd: rstd * (dn - n * mean(dn * n)).
        dx_tile = r[:, None] * (dn - n * (tl.sum(dn * n, 1) / C)[:, None])
        tl.store(dx + offs, dx_tile.to(dx.dtype.element_ty), mask=mask)
        tl.store(dz + offs, dz_tile.to(dz.dtype.element_ty), mask=mask)
    tl.store(dweight_part + pid * C + cols, dw, mask=cols < C)


def rmsnorm_gate_fwd(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """y = RMSNorm(x) * weight * sigmoid(z) over the last dim.

    Args:
        x, z (Tensor): [..., C], one dtype (bf16, fp16 or fp32).
        weight (Tensor): [C].
    Returns:
        y [..., C] contiguous in x.dtype; rstd [...] float32.
    """
    C = x.shape[-1]
    R = x.shape[:-1].numel()
    x2, z2 = x.reshape(R, C).contiguous(), z.reshape(R, C).contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if R == 0 or C == 0:  # nothing to normalise (rstd is only read by the backward, which returns early too)
        return y, rstd.zero_()
    BLOCK_R = _rows(C)
    rmsnorm_gate_fwd_kernel_main[(triton.cdiv(R, BLOCK_R),)](
        x2, z2, weight.contiguous(), y, rstd, R, C, float(eps),
        BLOCK_R=BLOCK_R, BLOCK_C=triton.next_power_of_2(C), num_warps=8 if C >= 2048 else 4)
    return y, rstd


def rmsnorm_gate_bwd(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `rmsnorm_gate_fwd` given dy [..., C] and its rstd.

    Returns:
        (dx [..., C] in x.dtype, dz [..., C] in z.dtype, dweight [C] in weight.dtype).
    """
    C = x.shape[-1]
    R = x.shape[:-1].numel()
    x2, z2, dy2 = (t.reshape(R, C).contiguous() for t in (x, z, dy))
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    if R == 0 or C == 0:
        return dx, dz, torch.zeros_like(weight)
    BLOCK_R = _rows(C)
    tiles = triton.cdiv(R, BLOCK_R)
    programs = max(1, min(tiles, PROGRAMS_PER_SM * sm_count(x.device)))
    dweight_part = torch.empty((programs, C), dtype=torch.float32, device=x.device)
    rmsnorm_gate_bwd_kernel_main[(programs,)](
        x2, z2, weight.contiguous(), rstd.reshape(-1).contiguous(), dy2, dx, dz, dweight_part, R, C,
        triton.cdiv(tiles, programs),
        BLOCK_R=BLOCK_R, BLOCK_C=triton.next_power_of_2(C), num_warps=8 if C >= 2048 else 4)
    return dx, dz, dweight_part.sum(0).to(weight.dtype)


@triton.jit
def qk_norm_rope_fwd_kernel_heads(x, weight, cos1, cos2, sin1, sin2, out, rstd, stride_xh, stride_oh, H, D, eps,
                                  BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    """Normalise and rotate the H heads of one token; x, out point at the token, cos/sin halves are loaded."""
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF)
    half = D // 2
    mask = (heads[:, None] < H) & (cols[None, :] < half)
    x1 = tl.load(x + heads[:, None] * stride_xh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + heads[:, None] * stride_xh + half + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(weight + cols, mask=cols < half, other=0.0).to(tl.float32)
    w2 = tl.load(weight + half + cols, mask=cols < half, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)
    u1 = x1 * r[:, None] * w1[None, :]
    u2 = x2 * r[:, None] * w2[None, :]
    # rotate_half(u) = (-u2, u1): out = u * cos + rotate_half(u) * sin.
    o1 = u1 * cos1[None, :] - u2 * sin1[None, :]
    o2 = u2 * cos2[None, :] + u1 * sin2[None, :]
    tl.store(out + heads[:, None] * stride_oh + cols[None, :], o1.to(out.dtype.element_ty), mask=mask)
    tl.store(out + heads[:, None] * stride_oh + half + cols[None, :], o2.to(out.dtype.element_ty), mask=mask)
    tl.store(rstd + heads, r, mask=heads < H)


@triton.jit
def qk_norm_rope_fwd_kernel_main(q, k, q_weight, k_weight, cos, sin, q_out, k_out, q_rstd, k_rstd,
                                 T, HQ, HK, D, eps,
                                 stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                                 stride_qob, stride_qot, stride_qoh, stride_kob, stride_kot, stride_koh,
                                 stride_cb, stride_ct, stride_sb, stride_st,
                                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, HALF: tl.constexpr):
    """One program: every q and k head of one token (b, t); the rotary tables are read once."""
    token = tl.program_id(0)
    b = (token // T).to(tl.int64)
    t = (token % T).to(tl.int64)
    cols = tl.arange(0, HALF)
    half = D // 2
    col_ok = cols < half
    cos_row = cos + b * stride_cb + t * stride_ct
    sin_row = sin + b * stride_sb + t * stride_st
    cos1 = tl.load(cos_row + cols, mask=col_ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_row + half + cols, mask=col_ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_row + cols, mask=col_ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_row + half + cols, mask=col_ok, other=0.0).to(tl.float32)
    qk_norm_rope_fwd_kernel_heads(q + b * stride_qb + t * stride_qt, q_weight, cos1, cos2, sin1, sin2,
                                  q_out + b * stride_qob + t * stride_qot, q_rstd + token.to(tl.int64) * HQ,
                                  stride_qh, stride_qoh, HQ, D, eps, BLOCK_HQ, HALF)
    qk_norm_rope_fwd_kernel_heads(k + b * stride_kb + t * stride_kt, k_weight, cos1, cos2, sin1, sin2,
                                  k_out + b * stride_kob + t * stride_kot, k_rstd + token.to(tl.int64) * HK,
                                  stride_kh, stride_koh, HK, D, eps, BLOCK_HK, HALF)


@triton.jit
def qk_norm_rope_bwd_kernel_heads(x, weight, rstd, dout, dx, dw1, dw2, cos1, cos2, sin1, sin2,
                                  stride_xh, stride_dh, stride_dxh, H, D,
                                  BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    """Gradient of the H heads of one token; returns the weight-gradient halves plus this token's share."""
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF)
    half = D // 2
    mask = (heads[:, None] < H) & (cols[None, :] < half)
    x1 = tl.load(x + heads[:, None] * stride_xh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + heads[:, None] * stride_xh + half + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g1 = tl.load(dout + heads[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(dout + heads[:, None] * stride_dh + half + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(weight + cols, mask=cols < half, other=0.0).to(tl.float32)
    w2 = tl.load(weight + half + cols, mask=cols < half, other=0.0).to(tl.float32)
    r = tl.load(rstd + heads, mask=heads < H, other=0.0)
    n1 = x1 * r[:, None]
    n2 = x2 * r[:, None]
    # Adjoint of (u1, u2) -> (u1 cos1 - u2 sin1, u2 cos2 + u1 sin2).
    du1 = g1 * cos1[None, :] + g2 * sin2[None, :]
    du2 = g2 * cos2[None, :] - g1 * sin1[None, :]
    dw1 += tl.sum(du1 * n1, 0)
    dw2 += tl.sum(du2 * n2, 0)
    dn1 = du1 * w1[None, :]
    dn2 = du2 * w2[None, :]
    proj = (tl.sum(dn1 * n1, 1) + tl.sum(dn2 * n2, 1)) / D
    dx1 = r[:, None] * (dn1 - n1 * proj[:, None])
    dx2 = r[:, None] * (dn2 - n2 * proj[:, None])
    tl.store(dx + heads[:, None] * stride_dxh + cols[None, :], dx1.to(dx.dtype.element_ty), mask=mask)
    tl.store(dx + heads[:, None] * stride_dxh + half + cols[None, :], dx2.to(dx.dtype.element_ty), mask=mask)
    return dw1, dw2


@triton.jit
def qk_norm_rope_bwd_kernel_main(q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd, dq_out, dk_out, dq, dk,
                                 dweight_part, num_tokens, tokens_per_program, T, HQ, HK, D,
                                 stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                                 stride_dqob, stride_dqot, stride_dqoh, stride_dkob, stride_dkot, stride_dkoh,
                                 stride_dqb, stride_dqt, stride_dqh, stride_dkb, stride_dkt, stride_dkh,
                                 stride_cb, stride_ct, stride_sb, stride_st,
                                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, HALF: tl.constexpr):
    """Persistent program p: tokens p, p + P, ...; its partial weight gradients go to dweight_part[p] as
    [q_weight (D), k_weight (D)]."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, HALF)
    half = D // 2
    col_ok = cols < half
    dwq1 = tl.zeros([HALF], dtype=tl.float32)
    dwq2 = tl.zeros([HALF], dtype=tl.float32)
    dwk1 = tl.zeros([HALF], dtype=tl.float32)
    dwk2 = tl.zeros([HALF], dtype=tl.float32)
    for i in range(tokens_per_program):
        token = pid + i * num_programs
        if token < num_tokens:
            b = (token // T).to(tl.int64)
            t = (token % T).to(tl.int64)
            cos_row = cos + b * stride_cb + t * stride_ct
            sin_row = sin + b * stride_sb + t * stride_st
            cos1 = tl.load(cos_row + cols, mask=col_ok, other=0.0).to(tl.float32)
            cos2 = tl.load(cos_row + half + cols, mask=col_ok, other=0.0).to(tl.float32)
            sin1 = tl.load(sin_row + cols, mask=col_ok, other=0.0).to(tl.float32)
            sin2 = tl.load(sin_row + half + cols, mask=col_ok, other=0.0).to(tl.float32)
            dwq1, dwq2 = qk_norm_rope_bwd_kernel_heads(
                q + b * stride_qb + t * stride_qt, q_weight, q_rstd + tl.cast(token, tl.int64) * HQ,
                dq_out + b * stride_dqob + t * stride_dqot, dq + b * stride_dqb + t * stride_dqt,
                dwq1, dwq2, cos1, cos2, sin1, sin2, stride_qh, stride_dqoh, stride_dqh, HQ, D, BLOCK_HQ, HALF)
            dwk1, dwk2 = qk_norm_rope_bwd_kernel_heads(
                k + b * stride_kb + t * stride_kt, k_weight, k_rstd + tl.cast(token, tl.int64) * HK,
                dk_out + b * stride_dkob + t * stride_dkot, dk + b * stride_dkb + t * stride_dkt,
                dwk1, dwk2, cos1, cos2, sin1, sin2, stride_kh, stride_dkoh, stride_dkh, HK, D, BLOCK_HK, HALF)
    part = dweight_part + pid * 2 * D
    tl.store(part + cols, dwq1, mask=col_ok)
    tl.store(part + half + cols, dwq2, mask=col_ok)
    tl.store(part + D + cols, dwk1, mask=col_ok)
    tl.store(part + D + half + cols, dwk2, mask=col_ok)


def _table_strides(table: torch.Tensor) -> tuple[int, int]:
    """(batch, token) strides of a [B or 1, T, D] table; a batch of one broadcasts (stride 0)."""
    return (0 if table.shape[0] == 1 else table.stride(0)), table.stride(1)


def _head_blocks(HQ: int, HK: int, D: int) -> dict:
    """Tile sizes of the qk_norm_rope kernels: every q head, every k head and half of D of one token (at least
    1: a side without heads is masked off entirely)."""
    return dict(BLOCK_HQ=max(1, triton.next_power_of_2(HQ)), BLOCK_HK=max(1, triton.next_power_of_2(HK)),
                HALF=triton.next_power_of_2(D // 2))


def qk_norm_rope_fwd(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm over D then rotate-half RoPE, of q and k in one pass.

    Args:
        q (Tensor): [B, T, Hq, D]; k (Tensor): [B, T, Hk, D]; last dims contiguous, D even.
        q_weight, k_weight (Tensor): [D].
        cos, sin (Tensor): [B or 1, T, D], last dim contiguous.
    Returns:
        q_out, k_out (like q, k); q_rstd [B, T, Hq], k_rstd [B, T, Hk] float32.
    """
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q_rstd = torch.empty((B, T, HQ), dtype=torch.float32, device=q.device)
    k_rstd = torch.empty((B, T, HK), dtype=torch.float32, device=q.device)
    if B * T == 0 or D == 0:  # nothing to normalise (the backward returns early too)
        return q_out, k_out, q_rstd.zero_(), k_rstd.zero_()
    qk_norm_rope_fwd_kernel_main[(B * T,)](
        q, k, q_weight.contiguous(), k_weight.contiguous(), cos, sin, q_out, k_out, q_rstd, k_rstd,
        T, HQ, HK, D, float(eps),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        *_table_strides(cos), *_table_strides(sin),
        **_head_blocks(HQ, HK, D), num_warps=4)
    return q_out, k_out, q_rstd, k_rstd


def qk_norm_rope_bwd(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, q_rstd: torch.Tensor, k_rstd: torch.Tensor,
                     dq_out: torch.Tensor,
                     dk_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `qk_norm_rope_fwd` given dq_out [B, T, Hq, D], dk_out [B, T, Hk, D] and the saved rstd.

    Returns:
        (dq like q, dk like k, dq_weight [D] and dk_weight [D] in the weights' dtypes).
    """
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    q, k, cos, sin, dq_out, dk_out = (t if t.stride(-1) == 1 else t.contiguous()
                                      for t in (q, k, cos, sin, dq_out, dk_out))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if B * T == 0 or D == 0:
        return dq, dk, torch.zeros_like(q_weight), torch.zeros_like(k_weight)
    num_tokens = B * T
    programs = max(1, min(num_tokens, PROGRAMS_PER_SM * sm_count(q.device)))
    dweight_part = torch.empty((programs, 2, D), dtype=torch.float32, device=q.device)
    qk_norm_rope_bwd_kernel_main[(programs,)](
        q, k, q_weight.contiguous(), k_weight.contiguous(), cos, sin, q_rstd.contiguous(), k_rstd.contiguous(),
        dq_out, dk_out, dq, dk, dweight_part, num_tokens, triton.cdiv(num_tokens, programs), T, HQ, HK, D,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        dq_out.stride(0), dq_out.stride(1), dq_out.stride(2), dk_out.stride(0), dk_out.stride(1), dk_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        *_table_strides(cos), *_table_strides(sin),
        **_head_blocks(HQ, HK, D), num_warps=4)
    return dq, dk, dweight_part[:, 0].sum(0).to(q_weight.dtype), dweight_part[:, 1].sum(0).to(k_weight.dtype)
