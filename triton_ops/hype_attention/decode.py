"""Split-KV decode of HyPE attention against a KV cache (flash-decoding, Triton).

One program streams one slice of one row's cache for one kv head, and serves every query that reads that head
at once (the GROUP = Hq / Hkv q heads times the Tq new tokens, as the rows of one tile), so K and V are read
once. Each slice writes a normalised partial output and its log-sum-exp; a second kernel merges the slices.

The number of slices comes from shapes alone (batch, kv heads, cache capacity and the SM count), and each
program derives its slice of the valid tokens from cache_seqlens on the device, so the launch has no host
read and no data-dependent allocation: it can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..device import sm_count
from .fwd import dot_precision, hype_row_factor, hype_row_factors, inputs_reason

# (BLOCK_N, num_warps, num_stages, resident programs per SM) per head dim: tiles of the cache streamed per step,
# and how many programs of that shape fit on one SM at once (shared memory: ~72 KB for D = 128, ~98 KB for 64).
DECODE_CONFIGS = {64: (128, 4, 3, 2), 128: (64, 4, 3, 3)}
# No slice shorter than MIN_SLICE tokens of capacity.
MIN_SLICE = 256
# Query rows served per kv head (Tq * Hq / Hkv) live in one register tile.
MAX_ROWS = 128


def unsupported_reason(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_table: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why the decode kernels cannot run the inputs, or None. q [B, Tq, Hq, D]; caches [B, S_max, Hkv, D] or
    paged [num_blocks, block_size, Hkv, D] (any block size)."""
    reason = inputs_reason(q, k_cache, v_cache, "k_cache", "v_cache")
    if reason is None and q.shape[1] * (q.shape[2] // k_cache.shape[2]) > MAX_ROWS:
        reason = (f"the Triton HyPE decode kernels serve at most {MAX_ROWS} query rows per kv head "
                  f"(Tq * Hq / Hkv), got Tq = {q.shape[1]}, Hq / Hkv = {q.shape[2] // k_cache.shape[2]}: use "
                  f"hype_attn for longer chunks")
    return reason


def num_slices(batch_kv_heads: int, capacity: int, resident_per_sm: int, device: torch.device) -> int:
    """Slices per (row, kv head), from shapes only: as many as fill one wave of resident programs on every SM
    without starting a second (a few programs left for a second wave would double the time)."""
    wanted = (resident_per_sm * sm_count(device)) // max(batch_kv_heads, 1)
    return max(1, min(wanted, triton.cdiv(capacity, MIN_SLICE)))


@triton.jit
def hype_attn_decode_fwd_kernel_split(
    q, k_cache, v_cache, cache_seqlens, block_table, o, o_part, lse_part,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_table, num_splits,
    scale_log2e, alpha, inv_log_alpha,
    TQ, HQ, HKV, GROUP, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr, USE_HYPE: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: slice `split` of row b's valid tokens, kv head hk, all GROUP * TQ queries reading it.
    Tile row r holds query token i = r // GROUP of q head hk * GROUP + r % GROUP."""
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    hk = pid_bh % HKV
    b = pid_bh // HKV
    b64 = b.to(tl.int64)
    seqlen = tl.load(cache_seqlens + b).to(tl.int32)

    offs_r = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    token = offs_r // GROUP
    head = hk * GROUP + offs_r % GROUP
    row_ok = offs_r < TQ * GROUP
    t = seqlen - TQ + token  # absolute position of each query row
    row_factor = hype_row_factor(t, scale_log2e, alpha, inv_log_alpha, USE_HYPE)

    blocks = tl.cdiv(seqlen, BLOCK_N)
    blocks_per_split = tl.cdiv(blocks, num_splits)
    start = split * blocks_per_split * BLOCK_N
    end = tl.minimum(seqlen, start + blocks_per_split * BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if start < end:
        q_tile = tl.load(q + b64 * stride_qb + token[:, None] * stride_qt + head[:, None] * stride_qh
                         + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if PAGED:
            k_base = k_cache + hk * stride_kh
            v_base = v_cache + hk * stride_vh
        else:
            k_base = k_cache + b64 * stride_kb + hk * stride_kh
            v_base = v_cache + b64 * stride_vb + hk * stride_vh
        for start_n in range(start, end, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < seqlen
            if PAGED:
                page = tl.load(block_table + b64 * stride_table + cols // PAGE_SIZE, mask=col_ok, other=0)
                slot = page.to(tl.int64) * stride_kb + (cols % PAGE_SIZE) * stride_kt
                slot_v = page.to(tl.int64) * stride_vb + (cols % PAGE_SIZE) * stride_vt
            else:
                slot = cols.to(tl.int64) * stride_kt
                slot_v = cols.to(tl.int64) * stride_vt
            k_t = tl.load(k_base + slot[None, :] + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            v_tile = tl.load(v_base + slot_v[:, None] + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            qk = tl.dot(q_tile, k_t, input_precision=DOT_PRECISION)
            # cols <= t also drops the tokens past seqlen (t <= seqlen - 1).
            qk = tl.where(cols[None, :] <= t[:, None], qk * row_factor[:, None], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # Rows with no visible key yet keep m = -inf; shift them by 0 so exp2 gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(qk - m_safe[:, None])
            correction = tl.exp2(m_i - m_safe)
            l_i = l_i * correction + tl.sum(p, 1)
            acc = acc * correction[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
            m_i = m_new

    if SINGLE_SPLIT:
        out = acc / l_i[:, None]
        tl.store(o + b64 * stride_ob + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(o.dtype.element_ty), mask=row_ok[:, None])
    else:
        # Partials laid out [B, TQ, HQ, num_splits, (D)]; an empty slice stores lse = -inf and zeros.
        part = ((b64 * TQ + token) * HQ + head) * num_splits + split
        has_keys = l_i > 0
        out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
        tl.store(o_part + part[:, None] * D + offs_d[None, :], out, mask=row_ok[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_part + part, lse, mask=row_ok)


@triton.jit
def hype_attn_decode_fwd_kernel_combine(o_part, lse_part, o, stride_ob, stride_ot, stride_oh, num_splits, TQ, HQ,
                                        D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per query row (b, i, h): o = sum_s w_s o_s with w_s = softmax over slices of lse_s."""
    row = tl.program_id(0).to(tl.int64)
    h = row % HQ
    i = (row // HQ) % TQ
    b = row // (HQ * TQ)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    split_ok = offs_s < num_splits
    lse = tl.load(lse_part + row * num_splits + offs_s, mask=split_ok, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, 0))
    parts = tl.load(o_part + (row * num_splits + offs_s)[:, None] * D + offs_d[None, :], mask=split_ok[:, None],
                    other=0.0)
    out = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(o + b * stride_ob + i * stride_ot + h * stride_oh + offs_d, out.to(o.dtype.element_ty))


def hype_attn_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     alpha: Optional[float] = None, scale: Optional[float] = None,
                     block_table: Optional[torch.Tensor] = None, num_splits: Optional[int] = None) -> torch.Tensor:
    """HyPE attention of Tq new queries per row against a KV cache.

    Args:
        q (Tensor): [B, Tq, Hq, D], last dim contiguous; bf16 or fp16 (fp32 under the interpreter only);
            D in {64, 128}.
        k_cache, v_cache (Tensor): [B, S_max, Hkv, D], or paged [num_blocks, block_size, Hkv, D].
        cache_seqlens (Tensor): [B] int, valid tokens of each row including the Tq new ones (>= Tq);
            query i of row b sits at position cache_seqlens[b] - Tq + i and sees keys j <= that position.
        alpha (float): HyPE constant > 1, or None (s_t = 1).
        scale (float): logit scale > 0, default D^-0.5.
        block_table (Tensor): [B, max_blocks] int block indices of each row, for paged caches.
        num_splits (int): slices of the cache per (row, kv head); default from shapes and the SM count.
    Returns:
        o [B, Tq, Hq, D] in q.dtype.
    """
    B, TQ, HQ, D = q.shape
    HKV = k_cache.shape[2]
    group = HQ // HKV
    scale = D ** -0.5 if scale is None else float(scale)
    scale_log2e, alpha_f, inv_log_alpha = hype_row_factors(scale, alpha)
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    BLOCK_N, num_warps, num_stages, resident_per_sm = DECODE_CONFIGS[D]
    if num_splits is None:
        num_splits = num_slices(B * HKV, capacity, resident_per_sm, q.device)
    o = torch.empty_like(q)
    if B * TQ == 0:
        return o
    BLOCK_M = max(16, triton.next_power_of_2(TQ * group))
    single = num_splits == 1
    if single:
        o_part = lse_part = None
    else:
        o_part = torch.empty((B, TQ, HQ, num_splits, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, TQ, HQ, num_splits), dtype=torch.float32, device=q.device)
    hype_attn_decode_fwd_kernel_split[(num_splits, B * HKV)](
        q, k_cache, v_cache, cache_seqlens, block_table, o, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1), o.stride(2),
        block_table.stride(0) if paged else 0, num_splits,
        scale_log2e, alpha_f, inv_log_alpha,
        TQ=TQ, HQ=HQ, HKV=HKV, GROUP=group, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PAGED=paged,
        PAGE_SIZE=k_cache.shape[1] if paged else 1, USE_HYPE=alpha is not None, SINGLE_SPLIT=single,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages)
    if not single:
        hype_attn_decode_fwd_kernel_combine[(B * TQ * HQ,)](
            o_part, lse_part, o, o.stride(0), o.stride(1), o.stride(2), num_splits,
            TQ=TQ, HQ=HQ, D=D, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4)
    return o
