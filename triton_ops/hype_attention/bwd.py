"""Backward kernels of HyPE attention (FlashAttention-2 style, Triton).

With c_t = scale * s_t, P = softmax(c_t q_t . k_j) and dS = P * (dP - delta), delta_t = rowsum(o_t * do_t):
    dv_j = sum_t P_tj do_t,   dk_j = sum_t c_t dS_tj q_t,   dq_t = c_t sum_j dS_tj k_j.
Three launches: `_preprocess` (delta), `_dkdv` (one program per key block and kv head, looping over the query
blocks of every q head of its GQA group, so dk and dv accumulate in registers without atomics) and `_dq` (one
program per query block and q head, looping over key blocks). Both recompute P from the forward's
log-sum-exp. c_t is folded into dS before the dk product (per query column) and applied once to dq at the end.

Only the blocks that cross the diagonal or the end of a sequence pay for masks: the dk/dv loop runs the query
blocks in three ranges (diagonal, full, partial last block). Past the end of a sequence, pointer loads read zeros
and TMA loads read the next sequence's rows; the masked ranges drop those rows from P explicitly, and keys past
the end only feed dk/dv rows that are never stored. Contiguous 16-bit inputs on Hopper load by TMA, as in the
forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .fwd import (LN2, LOG2E, block_schedule, dot_precision, hype_row_factor, hype_row_factors, kernel_config,
                  load_rows, locate_query_block, locate_tile, row_descriptor, search_steps, use_tma)
from .fwd import unsupported_reason as fwd_unsupported_reason

# Per head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the dk/dv kernel (BLOCK_N keys held, BLOCK_M
# queries streamed) and of the dq kernel (BLOCK_M queries held, BLOCK_N keys streamed).
# D = 128: the fastest on an H100 of `python -m benches.hype_attn_tune` (bf16, causal, B4 T4096 and B1 T16384;
# dk/dv (64, 64, 4, 2) is 1.08x / 1.11x the earlier (64, 128, 8, 2), the best of an H200 sweep); D = 64: not swept.
DKDV_CONFIGS = {64: (64, 128, 8, 2), 128: (64, 64, 4, 2)}
DQ_CONFIGS = {64: (128, 64, 8, 2), 128: (128, 64, 8, 3)}
PREPROCESS_BLOCK_M = 64


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> Optional[str]:
    """Why the backward kernels cannot run the inputs, or None (the same limits as the forward)."""
    return fwd_unsupported_reason(q, k, v, causal)


@triton.jit
def hype_attn_bwd_kernel_preprocess(o, do, delta, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot,
                                    stride_doh, T, HQ, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, t] = sum_d o * do in float32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = rows < T
    o_tile = tl.load(o + b * stride_ob + h * stride_oh + rows.to(tl.int64)[:, None] * stride_ot + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0).to(tl.float32)
    do_tile = tl.load(do + b * stride_dob + h * stride_doh + rows.to(tl.int64)[:, None] * stride_dot
                      + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(delta + (b * HQ + h) * T + rows, tl.sum(o_tile * do_tile, 1), mask=row_ok)


@triton.jit
def hype_attn_bwd_kernel_dkdv_tile(dk, dv, k_tile, v_tile, q, do, lse_base, delta_base, row_base, col0,
                                   stride_qt, stride_qh, stride_dot, stride_doh, T, start, end, T_len, pos_offset,
                                   cols, scale_log2e, alpha, inv_log_alpha,
                                   GROUP, D: tl.constexpr, BLOCK_M: tl.constexpr,
                                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, USE_HYPE: tl.constexpr,
                                   USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dk, dv [BLOCK_N, D] of one key block over the query blocks [start, end) of each of the GROUP
    q heads (one flat loop over (head, block) pairs keeps register pressure at that of a single loop)."""
    offs_m = tl.arange(0, BLOCK_M)
    blocks = tl.cdiv(end - start, BLOCK_M)
    # An empty range must not reach the loop. Triton's software pipeliner evaluates the first step's `step // blocks`
    # before the loop even when it runs no step; with blocks == 0 that division is undefined, and the compiled code
    # (Triton 3.6, sm_90a PTX) lost the empty-loop predicate of the prologue's TMA loads. Those loads then completed
    # on a barrier the next range had re-initialised, and the kernel hung, intermittently (one packed sequence of 58
    # queries and 116 keys, D = 128, not causal: test_gpu_dkdv_after_an_empty_query_range).
    if blocks > 0:
        for step in range(0, GROUP * blocks):
            g = step // blocks
            start_m = start + (step - g * blocks) * BLOCK_M
            rows = start_m + offs_m
            if USE_TMA:
                q_src = q
                do_src = do
            else:
                q_src = q + g * stride_qh
                do_src = do + g * stride_doh
            q_tile = load_rows(q_src, row_base, col0 + g * D, start_m, stride_qt, T_len, BLOCK_M, D, MASKED,
                               USE_TMA)
            do_tile = load_rows(do_src, row_base, col0 + g * D, start_m, stride_dot, T_len, BLOCK_M, D, MASKED,
                                USE_TMA)
            stats = g * T + rows
            if MASKED:
                row_ok = rows < T_len
                lse2 = tl.load(lse_base + stats, mask=row_ok, other=0.0) * LOG2E
                delta = tl.load(delta_base + stats, mask=row_ok, other=0.0)
            else:
                lse2 = tl.load(lse_base + stats) * LOG2E
                delta = tl.load(delta_base + stats)
            t = pos_offset + rows
            row_factor = hype_row_factor(t, scale_log2e, alpha, inv_log_alpha, USE_HYPE)
            qk_t = tl.dot(k_tile, tl.trans(q_tile), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            p_t = tl.exp2(qk_t * row_factor[None, :] - lse2[None, :])
            if MASKED:
                # Rows past the sequence may hold another sequence's data (TMA): drop them explicitly.
                valid = row_ok[None, :]
                if CAUSAL:
                    valid = valid & (cols[:, None] <= t[None, :])
                p_t = tl.where(valid, p_t, 0.0)
            dv = tl.dot(p_t.to(do_tile.dtype), do_tile, dv, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v_tile, tl.trans(do_tile), input_precision=DOT_PRECISION)
            # row_factor / log2(e) = scale * s_t: the logit's derivative factor for this query column.
            ds_t = p_t * (dp_t - delta[None, :]) * (row_factor * LN2)[None, :]
            dk = tl.dot(ds_t.to(q_tile.dtype), q_tile, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def hype_attn_bwd_kernel_dkdv(
    q, k, v, do, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, schedule,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    T, S, num_seqs, steps, scale_log2e, alpha, inv_log_alpha,
    HQ, HKV, GROUP, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_HYPE: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dk, dv of BLOCK_N keys of one (sequence, kv head), summed over its GROUP q heads.
    Key blocks with the most queries after them (the first ones) launch first. q, k, v, do are pointers or
    TMA descriptors of their row views (USE_TMA)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    hk = pid_bh % HKV
    b = pid_bh // HKV
    if VARLEN:
        tile = pid_n
        if tile >= tl.load(schedule + num_seqs):
            return
        n = locate_tile(schedule, tile, num_seqs, steps)
        start_n = (tile - tl.load(schedule + n)) * BLOCK_N
        q_start = tl.load(cu_seqlens_q + n).to(tl.int32)
        T_len = tl.load(cu_seqlens_q + n + 1).to(tl.int32) - q_start
        k_start = tl.load(cu_seqlens_k + n).to(tl.int32)
        S_len = tl.load(cu_seqlens_k + n + 1).to(tl.int32) - k_start
    else:
        start_n = pid_n * BLOCK_N
        q_start = 0
        T_len = T
        k_start = 0
        S_len = S

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    cols = start_n + offs_n
    col_ok = cols < S_len
    b64 = b.to(tl.int64)
    h0 = hk * GROUP
    if USE_TMA:
        k_src = k
        v_src = v
        q_src = q
        do_src = do
    else:
        k_src = k + b64 * stride_kb + tl.cast(k_start, tl.int64) * stride_kt + hk * stride_kh
        v_src = v + b64 * stride_vb + tl.cast(k_start, tl.int64) * stride_vt + hk * stride_vh
        q_src = q + b64 * stride_qb + tl.cast(q_start, tl.int64) * stride_qt + h0 * stride_qh
        do_src = do + b64 * stride_dob + tl.cast(q_start, tl.int64) * stride_dot + h0 * stride_doh
    k_tile = load_rows(k_src, b * S + k_start, hk * D, start_n, stride_kt, S_len, BLOCK_N, D, True, USE_TMA)
    v_tile = load_rows(v_src, b * S + k_start, hk * D, start_n, stride_vt, S_len, BLOCK_N, D, True, USE_TMA)
    pos_offset = S_len - T_len
    padded_end = tl.cdiv(T_len, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # Query rows i (t = pos_offset + i) see this block from t >= start_n on; from t >= start_n + BLOCK_N - 1
        # on they see all of it: masks only in between.
        first = (tl.maximum(start_n - pos_offset, 0) // BLOCK_M) * BLOCK_M
        full_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - pos_offset, 0), BLOCK_M) * BLOCK_M
        full_start = tl.minimum(tl.maximum(first, full_start), padded_end)
    else:
        first = 0
        full_start = 0
    # The partly filled last query block (if not already among the diagonal ones) needs bounds masks.
    tail_start = tl.maximum(full_start, (T_len // BLOCK_M) * BLOCK_M)

    dk_acc = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    lse_base = lse + (b64 * HQ + h0) * T + q_start
    delta_base = delta + (b64 * HQ + h0) * T + q_start
    row_base = b * T + q_start
    dk_acc, dv_acc = hype_attn_bwd_kernel_dkdv_tile(
        dk_acc, dv_acc, k_tile, v_tile, q_src, do_src, lse_base, delta_base, row_base, h0 * D, stride_qt,
        stride_qh, stride_dot, stride_doh, T, first, full_start, T_len, pos_offset, cols, scale_log2e, alpha,
        inv_log_alpha, GROUP, D, BLOCK_M, True, CAUSAL, USE_HYPE, USE_TMA, DOT_PRECISION)
    dk_acc, dv_acc = hype_attn_bwd_kernel_dkdv_tile(
        dk_acc, dv_acc, k_tile, v_tile, q_src, do_src, lse_base, delta_base, row_base, h0 * D, stride_qt,
        stride_qh, stride_dot, stride_doh, T, full_start, tail_start, T_len, pos_offset, cols, scale_log2e, alpha,
        inv_log_alpha, GROUP, D, BLOCK_M, False, CAUSAL, USE_HYPE, USE_TMA, DOT_PRECISION)
    dk_acc, dv_acc = hype_attn_bwd_kernel_dkdv_tile(
        dk_acc, dv_acc, k_tile, v_tile, q_src, do_src, lse_base, delta_base, row_base, h0 * D, stride_qt,
        stride_qh, stride_dot, stride_doh, T, tail_start, padded_end, T_len, pos_offset, cols, scale_log2e, alpha,
        inv_log_alpha, GROUP, D, BLOCK_M, True, CAUSAL, USE_HYPE, USE_TMA, DOT_PRECISION)

    k_row0 = tl.cast(k_start + start_n, tl.int64)
    tl.store(dk + b64 * stride_dkb + k_row0 * stride_dkt + hk * stride_dkh + offs_n[:, None] * stride_dkt
             + offs_d[None, :], dk_acc.to(dk.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv + b64 * stride_dvb + k_row0 * stride_dvt + hk * stride_dvh + offs_n[:, None] * stride_dvt
             + offs_d[None, :], dv_acc.to(dv.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def hype_attn_bwd_kernel_dq_tile(dq, q_tile, do_tile, lse2, delta, row_factor, t, k, v, kv_row_base, kv_col,
                                 stride_kt, stride_vt, start, end, S_len, D: tl.constexpr, BLOCK_N: tl.constexpr,
                                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, USE_TMA: tl.constexpr,
                                 DOT_PRECISION: tl.constexpr):
    """Accumulate sum_j dS_tj k_j [BLOCK_M, D] over the key blocks [start, end)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        k_tile = load_rows(k, kv_row_base, kv_col, start_n, stride_kt, S_len, BLOCK_N, D, MASKED, USE_TMA)
        v_tile = load_rows(v, kv_row_base, kv_col, start_n, stride_vt, S_len, BLOCK_N, D, MASKED, USE_TMA)
        qk = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION)
        p = tl.exp2(qk * row_factor[:, None] - lse2[:, None])
        if MASKED:
            cols = start_n + offs_n
            valid = cols[None, :] < S_len
            if CAUSAL:
                valid = valid & (cols[None, :] <= t[:, None])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_tile.dtype), k_tile, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def hype_attn_bwd_kernel_dq(
    q, k, v, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, schedule,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    T, S, num_seqs, steps, scale_log2e, alpha, inv_log_alpha,
    HQ, GROUP, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_HYPE: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: dq of BLOCK_M query rows of one (sequence, q head). Heaviest (last) blocks launch first."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % HQ
    b = pid_bh // HQ
    hk = h // GROUP
    start_m, q_start, T_len, k_start, S_len = locate_query_block(pid_m, schedule, cu_seqlens_q, cu_seqlens_k,
                                                                 num_seqs, steps, T, S, BLOCK_M, VARLEN)
    if start_m < 0:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = start_m + offs_m
    row_ok = rows < T_len
    t = S_len - T_len + rows
    row_factor = hype_row_factor(t, scale_log2e, alpha, inv_log_alpha, USE_HYPE)
    b64 = b.to(tl.int64)
    if USE_TMA:
        q_src = q
        do_src = do
        k_src = k
        v_src = v
    else:
        q_src = q + b64 * stride_qb + tl.cast(q_start, tl.int64) * stride_qt + h * stride_qh
        do_src = do + b64 * stride_dob + tl.cast(q_start, tl.int64) * stride_dot + h * stride_doh
        k_src = k + b64 * stride_kb + tl.cast(k_start, tl.int64) * stride_kt + hk * stride_kh
        v_src = v + b64 * stride_vb + tl.cast(k_start, tl.int64) * stride_vt + hk * stride_vh
    q_tile = load_rows(q_src, b * T + q_start, h * D, start_m, stride_qt, T_len, BLOCK_M, D, True, USE_TMA)
    do_tile = load_rows(do_src, b * T + q_start, h * D, start_m, stride_dot, T_len, BLOCK_M, D, True, USE_TMA)
    stats = (b64 * HQ + h) * T + q_start + rows
    lse2 = tl.load(lse + stats, mask=row_ok, other=0.0) * LOG2E
    delta_rows = tl.load(delta + stats, mask=row_ok, other=0.0)

    if CAUSAL:
        full_end = ((S_len - T_len + start_m + 1) // BLOCK_N) * BLOCK_N
        end = tl.minimum(S_len, S_len - T_len + start_m + BLOCK_M)
    else:
        full_end = (S_len // BLOCK_N) * BLOCK_N
        end = S_len
    dq_acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    kv_row_base = b * S + k_start
    dq_acc = hype_attn_bwd_kernel_dq_tile(dq_acc, q_tile, do_tile, lse2, delta_rows, row_factor, t, k_src, v_src,
                                          kv_row_base, hk * D, stride_kt, stride_vt, 0, full_end, S_len, D,
                                          BLOCK_N, False, CAUSAL, USE_TMA, DOT_PRECISION)
    dq_acc = hype_attn_bwd_kernel_dq_tile(dq_acc, q_tile, do_tile, lse2, delta_rows, row_factor, t, k_src, v_src,
                                          kv_row_base, hk * D, stride_kt, stride_vt, full_end, end, S_len, D,
                                          BLOCK_N, True, CAUSAL, USE_TMA, DOT_PRECISION)
    # row_factor / log2(e) = scale * s_t.
    dq_acc = dq_acc * (row_factor * LN2)[:, None]
    q_row0 = tl.cast(q_start + start_m, tl.int64)
    tl.store(dq + b64 * stride_dqb + q_row0 * stride_dqt + h * stride_dqh + offs_m[:, None] * stride_dqt
             + offs_d[None, :], dq_acc.to(dq.dtype.element_ty), mask=row_ok[:, None])


def hype_attn_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                  do: torch.Tensor, alpha: Optional[float] = None, scale: Optional[float] = None,
                  causal: bool = True, cu_seqlens_q: Optional[torch.Tensor] = None,
                  cu_seqlens_k: Optional[torch.Tensor] = None, *,
                  dkdv_config: Optional[tuple[int, int, int, int]] = None,
                  dq_config: Optional[tuple[int, int, int, int]] = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HyPE attention backward.

    Args:
        q, k, v, alpha, scale, causal, cu_seqlens_q, cu_seqlens_k: as given to `hype_attn_fwd`.
        o (Tensor): [B, T, Hq, D] forward output; lse (Tensor): [B, Hq, T] float32 from `hype_attn_fwd`.
        do (Tensor): [B, T, Hq, D] gradient of o, last dim contiguous.
        dkdv_config, dq_config: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the two kernels instead of
            DKDV_CONFIGS[D] / DQ_CONFIGS[D] (tuning sweeps).
    Returns:
        (dq [B, T, Hq, D], dk [B, S, Hkv, D], dv [B, S, Hkv, D]) in the dtypes of q, k, v.
    """
    B, T, HQ, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    scale_log2e, alpha_f, inv_log_alpha = hype_row_factors(scale, alpha)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if T == 0 or B * HQ == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((B, HQ, T), dtype=torch.float32, device=q.device)
    hype_attn_bwd_kernel_preprocess[(triton.cdiv(T, PREPROCESS_BLOCK_M), B * HQ)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), T,
        HQ=HQ, D=D, BLOCK_M=PREPROCESS_BLOCK_M)

    varlen = cu_seqlens_q is not None
    num_seqs = cu_seqlens_q.shape[0] - 1 if varlen else B
    steps = search_steps(num_seqs)
    tma = use_tma(q, k, v, do)
    common = dict(USE_HYPE=alpha is not None, CAUSAL=bool(causal), VARLEN=varlen, USE_TMA=tma,
                  DOT_PRECISION=dot_precision(q.dtype))

    BLOCK_M, BLOCK_N, num_warps, num_stages = kernel_config(dkdv_config, DKDV_CONFIGS[D], "dkdv_config")
    if tma:
        q_src, do_src = row_descriptor(q, BLOCK_M), row_descriptor(do, BLOCK_M)
        k_src, v_src = row_descriptor(k, BLOCK_N), row_descriptor(v, BLOCK_N)
    else:
        q_src, k_src, v_src, do_src = q, k, v, do
    if varlen:
        schedule = block_schedule(cu_seqlens_k, BLOCK_N)
        grid = (triton.cdiv(S, BLOCK_N) + num_seqs, HKV)
    else:
        schedule = None
        grid = (triton.cdiv(S, BLOCK_N), B * HKV)
    hype_attn_bwd_kernel_dkdv[grid](
        q_src, k_src, v_src, do_src, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, schedule,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        T, S, num_seqs, steps, scale_log2e, alpha_f, inv_log_alpha,
        HQ=HQ, HKV=HKV, GROUP=HQ // HKV, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **common,
        num_warps=num_warps, num_stages=num_stages)

    BLOCK_M, BLOCK_N, num_warps, num_stages = kernel_config(dq_config, DQ_CONFIGS[D], "dq_config")
    if tma:
        q_src, do_src = row_descriptor(q, BLOCK_M), row_descriptor(do, BLOCK_M)
        k_src, v_src = row_descriptor(k, BLOCK_N), row_descriptor(v, BLOCK_N)
    if varlen:
        schedule = block_schedule(cu_seqlens_q, BLOCK_M)
        grid = (triton.cdiv(T, BLOCK_M) + num_seqs, HQ)
    else:
        grid = (triton.cdiv(T, BLOCK_M), B * HQ)
    hype_attn_bwd_kernel_dq[grid](
        q_src, k_src, v_src, do_src, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, schedule,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        T, S, num_seqs, steps, scale_log2e, alpha_f, inv_log_alpha,
        HQ=HQ, GROUP=HQ // HKV, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **common,
        num_warps=num_warps, num_stages=num_stages)
    return dq, dk, dv
