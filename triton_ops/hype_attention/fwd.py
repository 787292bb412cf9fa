"""Forward kernel of HyPE attention (FlashAttention-2 style, Triton).

logit(t, j) = scale * s_t * q_t . k_j with s_t = ln(t + alpha) / ln(alpha) computed in float32 per query row,
causal mask j <= t. Query row i of a sequence with T queries and S keys sits at t = S - T + i.

The softmax runs in base 2: each row carries one float32 factor scale * s_t * log2(e), so a score costs one
fused multiply-add before exp2. Key blocks entirely below the diagonal of a query block skip the mask;
only the blocks that cross the diagonal (or the end of the keys) pay for it. Contiguous 16-bit inputs on Hopper
are loaded by TMA (fewer registers than pointer tiles: 139 vs 184 per thread for D = 128); strided inputs and the
interpreter use pointer loads.

The log-sum-exp saved for the backward pass is in natural-log units, float32, laid out [B, Hq, T]; for packed
sequences (B == 1) T is the packed length.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton >= 3.4); without them every load goes through pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

# Constants usable inside kernels.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim, fixed (no autotuning keyed on T). D = 128: the fastest
# of a sweep on an H200 (bf16, causal, B4 T4096 and B1 T16384; 227 KB of shared memory with TMA); D = 64: not swept.
FWD_CONFIGS = {64: (128, 64, 4, 3), 128: (128, 128, 8, 3)}
# Load tiles with TMA on Hopper and newer when the inputs allow it (contiguous, 16-byte aligned, 16-bit), unless
# $HYPENET_HYPE_TMA is "0": pointer loads instead, to tell a TMA-specific fault from others (the dk/dv kernel once
# hung on stale TMA loads: see hype_attn_bwd_kernel_dkdv_tile).
TMA_ENV = "HYPENET_HYPE_TMA"


def tma_setting(value: Optional[str]) -> bool:
    """Whether $HYPENET_HYPE_TMA (None when unset) allows TMA loads."""
    if value not in (None, "0", "1"):
        raise ValueError(f"{TMA_ENV} must be 0 or 1, got {value!r}")
    return value != "0"


def inputs_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_name: str = "k",
                  v_name: str = "v") -> Optional[str]:
    """Why the HyPE attention kernels (training or decode) cannot take these q, k, v, or None."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpret):
        return f"the Triton HyPE attention kernels need CUDA tensors (or TRITON_INTERPRET=1), got {q.device}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the Triton HyPE attention kernels support bf16, fp16 and (interpreter only) fp32, got {q.dtype}"
    if q.device.type == "cuda" and q.dtype == torch.float32:
        return ("the Triton HyPE attention kernels take bf16 or fp16 on CUDA: exact fp32 products have no "
                "tensor-core path (use the reference backend for fp32)")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return (f"the Triton HyPE attention kernels support head dims {SUPPORTED_HEAD_DIMS} (same for q, {k_name}, "
                f"{v_name}), got q {q.shape[-1]}, {v_name} {v.shape[-1]}")
    if q.shape[2] % k.shape[2] != 0:
        return f"Hq = {q.shape[2]} must be a multiple of Hkv = {k.shape[2]}"
    for name, t in (("q", q), (k_name, k), (v_name, v)):
        if t.stride(-1) != 1:
            return f"{name} must have a contiguous last dim, got strides {t.stride()}"
    return None


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> Optional[str]:
    """Why these kernels cannot run the inputs, or None. Shapes [B, T, Hq, D] / [B, S, Hkv, D]; causal and
    non-causal attention are both supported."""
    return inputs_reason(q, k, v)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs (interpreter only) get exact float32 products; 16-bit inputs ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


def hype_row_factors(scale: float, alpha: Optional[float]) -> tuple[float, float, float]:
    """Host constants of the per-row logit factor: (scale * log2 e, alpha, 1 / ln alpha); alpha None -> s = 1."""
    scale_log2e = scale / math.log(2.0)
    if alpha is None:
        return scale_log2e, 1.0, 0.0
    return scale_log2e, float(alpha), 1.0 / math.log(alpha)


def use_tma(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can carry these [B, L, H, D] tensors: Hopper or newer, not the interpreter,
    contiguous 16-bit tensors on 16-byte boundaries."""
    if not tma_setting(os.environ.get(TMA_ENV)):
        return False
    if TensorDescriptor is None or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if not all(t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and t.is_contiguous()
               and t.data_ptr() % 16 == 0 for t in tensors):
        return False
    return torch.cuda.get_device_capability(tensors[0].device)[0] >= 9


def row_descriptor(t: torch.Tensor, rows: int) -> "TensorDescriptor":
    """TMA descriptor of the [B * L, H * D] view of a contiguous [B, L, H, D] tensor, in [rows, D] tiles."""
    B, L, H, D = t.shape
    return TensorDescriptor.from_tensor(t.view(B * L, H * D), [rows, D])


def block_schedule(cu_seqlens: torch.Tensor, block: int) -> torch.Tensor:
    """[N + 1] int32 cumulative counts of `block`-row tiles of each packed sequence, computed on the device
    (no host read, so launches stay graph-capturable). Tile p of the grid belongs to the sequence n with
    schedule[n] <= p < schedule[n + 1]."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    tiles = torch.div(lengths + block - 1, block, rounding_mode="floor")
    return torch.cat([tiles.new_zeros(1), torch.cumsum(tiles, 0)]).to(torch.int32)


def search_steps(num_seqs: int) -> int:
    """Bisection steps that locate a tile among `num_seqs` sequences."""
    return max(1, math.ceil(math.log2(num_seqs + 1)))


@triton.jit
def locate_tile(schedule, tile, num_seqs, steps):
    """The sequence n with schedule[n] <= tile < schedule[n + 1] (bisection over the [N + 1] schedule)."""
    lo = 0
    hi = num_seqs
    for _ in range(steps):
        mid = (lo + hi) // 2
        right = tl.load(schedule + mid) <= tile
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def locate_query_block(pid_m, schedule, cu_seqlens_q, cu_seqlens_k, num_seqs, steps, T, S,
                       BLOCK_M: tl.constexpr, VARLEN: tl.constexpr):
    """(start_m, q_start, T_len, k_start, S_len) of the query block program pid_m handles: its first row within
    its sequence, where that sequence's queries and keys start, and their lengths. Heaviest (last) blocks come
    first. start_m < 0: packed batches launch more programs than they have blocks, and this one has none."""
    if VARLEN:
        tile = tl.load(schedule + num_seqs) - 1 - pid_m
        n = locate_tile(schedule, tl.maximum(tile, 0), num_seqs, steps)
        start_m = tl.where(tile < 0, -1, (tile - tl.load(schedule + n)) * BLOCK_M)
        q_start = tl.load(cu_seqlens_q + n).to(tl.int32)
        T_len = tl.load(cu_seqlens_q + n + 1).to(tl.int32) - q_start
        k_start = tl.load(cu_seqlens_k + n).to(tl.int32)
        S_len = tl.load(cu_seqlens_k + n + 1).to(tl.int32) - k_start
    else:
        start_m = (tl.cdiv(T, BLOCK_M) - 1 - pid_m) * BLOCK_M
        q_start = 0
        T_len = T
        k_start = 0
        S_len = S
    return start_m, q_start, T_len, k_start, S_len


@triton.jit
def hype_row_factor(t, scale_log2e, alpha, inv_log_alpha, USE_HYPE: tl.constexpr):
    """float32 scale * s_t * log2(e) for absolute positions t (int tensor)."""
    if USE_HYPE:
        return scale_log2e * (tl.log(t.to(tl.float32) + alpha) * inv_log_alpha)
    return tl.zeros(t.shape, dtype=tl.float32) + scale_log2e


@triton.jit
def load_rows(src, row_base, col, row, stride_row, n_valid, ROWS: tl.constexpr, D: tl.constexpr,
              MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [row, row + ROWS) x D of one head of one sequence, as a [ROWS, D] tile.

    USE_TMA: src is a TMA descriptor of the [rows, heads * D] view of a contiguous tensor; the tile starts at
    (row_base + row, col). Rows past the sequence then hold the next sequence's data (or zeros at the end of the
    tensor): callers must mask their contribution. Otherwise src points at the sequence's first row of the head,
    and with MASKED the rows >= n_valid read as zeros."""
    if USE_TMA:
        return src.load([row_base + row, col])
    else:
        offs_r = tl.arange(0, ROWS)
        ptrs = src + tl.cast(row, tl.int64) * stride_row + offs_r[:, None] * stride_row + tl.arange(0, D)[None, :]
        if MASKED:
            return tl.load(ptrs, mask=(row + offs_r)[:, None] < n_valid, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def hype_attn_fwd_kernel_tile(acc, l_i, m_i, q, row_factor, t, k, v, kv_row_base, kv_col, stride_kt, stride_vt,
                              start, end, S_len, D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                              CAUSAL: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the key blocks [start, end): unmasked blocks when MASKED is False."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        k_tile = load_rows(k, kv_row_base, kv_col, start_n, stride_kt, S_len, BLOCK_N, D, MASKED, USE_TMA)
        qk = tl.dot(q, tl.trans(k_tile), input_precision=DOT_PRECISION)
        if MASKED:
            cols = start_n + offs_n
            valid = cols[None, :] < S_len
            if CAUSAL:
                valid = valid & (cols[None, :] <= t[:, None])
            qk = tl.where(valid, qk * row_factor[:, None], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp2(qk - m_new[:, None])
        else:
            # row_factor > 0, so the row max of the scaled scores is the scaled row max.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * row_factor)
            p = tl.exp2(qk * row_factor[:, None] - m_new[:, None])
        correction = tl.exp2(m_i - m_new)
        l_i = l_i * correction + tl.sum(p, 1)
        v_tile = load_rows(v, kv_row_base, kv_col, start_n, stride_vt, S_len, BLOCK_N, D, MASKED, USE_TMA)
        acc = tl.dot(p.to(v_tile.dtype), v_tile, acc * correction[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def hype_attn_fwd_kernel_main(
    q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, schedule,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    T, S, num_seqs, steps, scale_log2e, alpha, inv_log_alpha,
    HQ, GROUP, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_HYPE: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (sequence, q head). Heaviest (last) query blocks launch first.
    q, k, v are pointers, or TMA descriptors of their [B * T, Hq * D] / [B * S, Hkv * D] views (USE_TMA)."""
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
    t = S_len - T_len + rows  # absolute positions of the query rows
    row_factor = hype_row_factor(t, scale_log2e, alpha, inv_log_alpha, USE_HYPE)

    b64 = b.to(tl.int64)
    q_row0 = (q_start + start_m).to(tl.int64)
    if USE_TMA:
        q_src = q
        k_src = k
        v_src = v
    else:
        q_src = q + b64 * stride_qb + tl.cast(q_start, tl.int64) * stride_qt + h * stride_qh
        k_src = k + b64 * stride_kb + tl.cast(k_start, tl.int64) * stride_kt + hk * stride_kh
        v_src = v + b64 * stride_vb + tl.cast(k_start, tl.int64) * stride_vt + hk * stride_vh
    q_tile = load_rows(q_src, b * T + q_start, h * D, start_m, stride_qt, T_len, BLOCK_M, D, True, USE_TMA)
    kv_row_base = b * S + k_start

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if CAUSAL:
        # Keys j <= t_min = S - T + start_m are visible to every row of the block; the rest until the last
        # row's position need the mask.
        full_end = ((S_len - T_len + start_m + 1) // BLOCK_N) * BLOCK_N
        end = tl.minimum(S_len, S_len - T_len + start_m + BLOCK_M)
    else:
        full_end = (S_len // BLOCK_N) * BLOCK_N
        end = S_len
    acc, l_i, m_i = hype_attn_fwd_kernel_tile(acc, l_i, m_i, q_tile, row_factor, t, k_src, v_src, kv_row_base,
                                              hk * D, stride_kt, stride_vt, 0, full_end, S_len, D, BLOCK_N, False,
                                              CAUSAL, USE_TMA, DOT_PRECISION)
    acc, l_i, m_i = hype_attn_fwd_kernel_tile(acc, l_i, m_i, q_tile, row_factor, t, k_src, v_src, kv_row_base,
                                              hk * D, stride_kt, stride_vt, full_end, end, S_len, D, BLOCK_N, True,
                                              CAUSAL, USE_TMA, DOT_PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = o + b64 * stride_ob + q_row0 * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(o.dtype.element_ty), mask=row_ok[:, None])
    lse_ptrs = lse + (b64 * HQ + h) * T + q_start + rows
    tl.store(lse_ptrs, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)


def kernel_config(config: Optional[tuple[int, int, int, int]], default: tuple[int, int, int, int],
                  name: str) -> tuple[int, int, int, int]:
    """`config` = (BLOCK_M, BLOCK_N, num_warps, num_stages) checked, or `default` when None. For tuning sweeps
    (benches.hype_attn_tune); the tuned tables of this package are what the op uses."""
    if config is None:
        return default
    ok = (isinstance(config, tuple) and len(config) == 4 and all(isinstance(x, int) for x in config)
          and all(x in (16, 32, 64, 128, 256) for x in config[:2]) and config[2] in (1, 2, 4, 8, 16)
          and 1 <= config[3] <= 8)
    if not ok:
        raise ValueError(f"{name} must be (BLOCK_M, BLOCK_N, num_warps, num_stages) with blocks powers of two in "
                         f"16..256, num_warps in 1..16 (a power of two) and 1..8 stages, got {config!r}")
    return config


def hype_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: Optional[float] = None,
                  scale: Optional[float] = None, causal: bool = True, cu_seqlens_q: Optional[torch.Tensor] = None,
                  cu_seqlens_k: Optional[torch.Tensor] = None, *,
                  config: Optional[tuple[int, int, int, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HyPE attention forward.

    Args:
        q (Tensor): [B, T, Hq, D], last dim contiguous; bf16 or fp16 (fp32 under the interpreter only);
            D in {64, 128}.
        k, v (Tensor): [B, S, Hkv, D], Hq % Hkv == 0; the queries are the last T of the S positions.
        alpha (float): HyPE constant > 1, or None (s_t = 1).
        scale (float): logit scale > 0, default D^-0.5.
        causal (bool): mask keys j > t.
        cu_seqlens_q, cu_seqlens_k (Tensor): [N + 1] int offsets of N packed sequences (B == 1), each with
            T_n <= S_n, or None.
        config: (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of FWD_CONFIGS[D] (tuning sweeps).
    Returns:
        o [B, T, Hq, D] in q.dtype; lse [B, Hq, T] float32 natural-log log-sum-exp of each row's logits
        (B == 1 and T the packed length for packed sequences).
    """
    B, T, HQ, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    scale_log2e, alpha_f, inv_log_alpha = hype_row_factors(scale, alpha)
    o = torch.empty_like(q)
    lse = torch.empty((B, HQ, T), dtype=torch.float32, device=q.device)
    BLOCK_M, BLOCK_N, num_warps, num_stages = kernel_config(config, FWD_CONFIGS[D], "config")
    varlen = cu_seqlens_q is not None
    if varlen:
        num_seqs = cu_seqlens_q.shape[0] - 1
        schedule = block_schedule(cu_seqlens_q, BLOCK_M)
        # Each sequence adds at most one partly filled tile: an upper bound known from shapes alone.
        grid = (triton.cdiv(T, BLOCK_M) + num_seqs, B * HQ)
    else:
        num_seqs, schedule = B, None
        grid = (triton.cdiv(T, BLOCK_M), B * HQ)
    if T == 0 or grid[1] == 0:
        return o, lse
    tma = use_tma(q, k, v)
    if tma:
        q_src, k_src, v_src = row_descriptor(q, BLOCK_M), row_descriptor(k, BLOCK_N), row_descriptor(v, BLOCK_N)
    else:
        q_src, k_src, v_src = q, k, v
    hype_attn_fwd_kernel_main[grid](
        q_src, k_src, v_src, o, lse, cu_seqlens_q, cu_seqlens_k, schedule,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        T, S, num_seqs, search_steps(num_seqs), scale_log2e, alpha_f, inv_log_alpha,
        HQ=HQ, GROUP=HQ // HKV, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        USE_HYPE=alpha is not None, CAUSAL=bool(causal), VARLEN=varlen, USE_TMA=tma,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse
