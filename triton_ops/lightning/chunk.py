"""Chunked Lightning Attention (constant per-head decay) in Triton: forward and backward.

Per head h, with gamma = exp(log_decay[h]) and a float32 state S [K, V]:
    S_t = gamma * S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t.

Everything here is one primitive, the *decayed causal scan* of three operands (a, b, c) in time order:
    out_t = scale * sum_{s <= t} gamma^(t-s) (a_t . b_s) c_s + state_out_scale * gamma^(t+1) a_t S_start
    S     <- gamma^L S + state_in_scale * sum_s gamma^(L-1-s) b_s^T c_s        (per chunk of L tokens)
or the same backwards in time (s >= t, exponents mirrored). With (a, b, c) = (q, k, v) it is the forward op.
The backward is three scans of the same kind:
    dq = scan forwards  of (do, v, k), state S^T (the forward state, transposed), start S0^T
    dv = scan backwards of (k, q, do), adjoint state dS = sum_s gamma^(s-t+1) scale q_s^T do_s, start dS_final
    dk = scan backwards of (v, do, q), adjoint state dS^T, start dS_final^T
and the adjoint left after the first token is d initial_state.

The decay is a constant per head, so the intra-chunk mask gamma^(t-s) is built once per program (no cumulative
decay tensors). Time is walked sequentially in chunks of BT tokens by one program per (sequence segment, head,
BV columns of the state), the fp32 state staying in registers. When the batch has too few (sequence, head,
column tile) triples to fill the GPU, each sequence is cut into segments of SEG_LEN tokens:
    stage segment_states: every segment's own state contribution, in parallel;
    stage segment_scan:   a short sequential pass over segments turns them into each segment's start state;
    stage output:         every segment walks its chunks from its start state, in parallel.
With one segment per sequence only the output stage runs (one kernel, inputs read once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..device import sm_count

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # powers of two for tl.dot; a [128, BV] fp32 state still fits registers
CHUNK = 64  # BT: tokens per chunk (a 64-row tile is one Hopper warpgroup MMA)
MIN_SEGMENT = 512  # shorter segments cost more in the segment stages than they win in parallelism
# Launch configuration (module constants so that benchmarks can compare alternatives). Swept on an H200
# (benches/NOTES.md): BV=64 with 4 warps and 2 stages is fastest at every shape (~200 registers, 76-88 KB of shared
# memory: two programs per SM); 3 stages (one program per SM) cost ~20%, 8 warps or BV=128 ~2x, BV=32 ~50%.
BLOCK_V = 64  # BV: state columns per program; the [K, BV] fp32 state takes K * BV / (32 * warps) registers
PROGRAMS_PER_SM = 2  # output-stage programs resident per SM; segmenting aims at filling exactly these
OUTPUT_WARPS, OUTPUT_STAGES = 4, 2
STATES_WARPS, STATES_STAGES = 4, 3


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """Why these kernels cannot run q [B, T, H, K], k [B, T, H, K], v [B, T, H, V]; None when they can."""
    if q.device.type != "cuda" and not (q.device.type == "cpu" and _interpreting()):
        return f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got device {q.device}"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return (f"q, k, v must share one dtype of {SUPPORTED_DTYPES}, got "
                f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "the Triton interpreter computes bf16 tl.dot wrongly; use float16 or float32 on the CPU"
    K, V = q.shape[-1], v.shape[-1]
    if K not in SUPPORTED_HEAD_DIMS or V not in SUPPORTED_HEAD_DIMS:
        return f"head dims K = {K}, V = {V} must each be one of {SUPPORTED_HEAD_DIMS}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _decay_pow(log_decay, n):
    """gamma^n for integer n >= 0 (gamma^0 = 1 exactly, also when gamma underflows)."""
    return tl.where(n == 0, 1.0, tl.exp(log_decay * n.to(tl.float32)))


@triton.jit
def _locate_segment(i_seg, cu_seqlens, seg_offsets, T, seg_len, num_segs, N,
                    SEARCH_STEPS: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Segment index -> (sequence n, segment index within it, segments of that sequence, first token of the
    sequence in the flattened token axis, sequence length). Packed (IS_VARLEN) with SEARCH_STEPS > 0:
    seg_offsets [N + 1] holds the first segment of every sequence and a binary search finds the sequence (indices
    past the last segment give i_s >= ns); SEARCH_STEPS == 0 means one segment per sequence."""
    if IS_VARLEN:
        if SEARCH_STEPS > 0:
            lo = i_seg * 0
            hi = lo + N
            for _ in tl.static_range(SEARCH_STEPS):
                mid = (lo + hi) // 2
                right = tl.load(seg_offsets + mid) <= i_seg
                lo = tl.where(right, mid, lo)
                hi = tl.where(right, hi, mid)
            i_n = lo
            first = tl.load(seg_offsets + i_n)
            ns = tl.load(seg_offsets + i_n + 1) - first
            i_s = i_seg - first
        else:
            i_n = i_seg
            ns = 1
            i_s = 0
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        i_n = i_seg // num_segs
        i_s = i_seg % num_segs
        ns = num_segs
        bos = i_n.to(tl.int64) * T
        seq_len = T
    return i_n, i_s, ns, bos, seq_len


@triton.jit
def _chunk_state_update(state, b_blk, c_blk, o_t, length, log_decay, state_in_scale,
                        REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Advance the [DA, BV] state over one chunk of `length` real rows: forwards
    S <- gamma^L S + sum_s gamma^(L-1-s) b_s^T c_s; backwards the rows are weighted gamma^(s+1) instead."""
    if REVERSE:
        steps = o_t + 1
    else:
        steps = length - 1 - o_t
    # Rows past the sequence end are zero-padded; their (negative-exponent) weights are masked, never inf * 0.
    row_decay = tl.where(o_t < length, _decay_pow(log_decay, tl.maximum(steps, 0)), 0.0)
    c_dec = (c_blk * (row_decay * state_in_scale)[:, None]).to(c_blk.dtype)
    return state * _decay_pow(log_decay, length) + tl.dot(tl.trans(b_blk), c_dec, input_precision=DOT_PRECISION)


@triton.jit
def lightning_attn_fwd_kernel_segment_states(
    b, c, log_decay, seg_states, cu_seqlens, seg_offsets,
    T, N, H, seg_len, num_segs, state_in_scale,
    DA: tl.constexpr, DC: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr, SEARCH_STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """State contribution of every segment on its own (zero start state).

    b [*, H, DA], c [*, H, DC] (flattened tokens); seg_states [S, H, DA, DC] fp32, S = the launched segments.
    Grid (S * H * DC / BV,). Forwards the last segment of a sequence is skipped (nothing follows it), backwards
    the first."""
    NV: tl.constexpr = DC // BV
    pid = tl.program_id(0)
    i_v = pid % NV
    i_h = (pid // NV) % H
    i_seg = pid // (NV * H)
    i_n, i_s, ns, bos, seq_len = _locate_segment(i_seg, cu_seqlens, seg_offsets, T, seg_len, num_segs, N,
                                                 SEARCH_STEPS, IS_VARLEN)
    if REVERSE:
        needed = (i_s > 0) & (i_s < ns)
    else:
        needed = i_s < ns - 1
    if needed:
        ld = tl.load(log_decay + i_h).to(tl.float32)
        o_t = tl.arange(0, BT)
        o_a = tl.arange(0, DA)
        o_c = i_v * BV + tl.arange(0, BV)
        seg_start = i_s * seg_len
        n_chunks = tl.cdiv(tl.minimum(seg_len, seq_len - seg_start), BT)
        state = tl.zeros([DA, BV], dtype=tl.float32)
        for ic in range(0, n_chunks):
            if REVERSE:
                t0 = seg_start + (n_chunks - 1 - ic) * BT
            else:
                t0 = seg_start + ic * BT
            length = tl.minimum(BT, seq_len - t0)
            rows = (bos + t0) * H + i_h
            row_ok = (o_t < length)[:, None]
            b_blk = tl.load(b + rows * DA + o_t[:, None] * (H * DA) + o_a[None, :], mask=row_ok, other=0.0)
            c_blk = tl.load(c + rows * DC + o_t[:, None] * (H * DC) + o_c[None, :], mask=row_ok, other=0.0)
            state = _chunk_state_update(state, b_blk, c_blk, o_t, length, ld, state_in_scale, REVERSE, DOT_PRECISION)
        p_s = seg_states + ((i_seg.to(tl.int64) * H + i_h) * DA + o_a[:, None]) * DC + o_c[None, :]
        tl.store(p_s, state)


@triton.jit
def lightning_attn_fwd_kernel_segment_scan(
    log_decay, seg_states, initial_state, cu_seqlens, seg_offsets,
    T, N, H, seg_len, num_segs,
    stride_init_n, stride_init_h, stride_init_a, stride_init_c,
    DA: tl.constexpr, DC: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_INITIAL: tl.constexpr,
):
    """Turn segment contributions into segment start states, in place, one sequence per program.

    seg_states [S, H, DA, DC] fp32; initial_state [N, H, DA, DC] by strides (it may be a transposed view).
    Start of the first segment (last, backwards) = the initial state; each next start = gamma^len * previous
    start + previous contribution. Grid (N * H * DC / BV,)."""
    NV: tl.constexpr = DC // BV
    pid = tl.program_id(0)
    i_v = pid % NV
    i_h = (pid // NV) % H
    i_n = pid // (NV * H)
    if IS_VARLEN:
        first = tl.load(seg_offsets + i_n)
        ns = tl.load(seg_offsets + i_n + 1) - first
        seq_len = (tl.load(cu_seqlens + i_n + 1) - tl.load(cu_seqlens + i_n)).to(tl.int32)
    else:
        first = i_n * num_segs
        ns = num_segs
        seq_len = T
    ld = tl.load(log_decay + i_h).to(tl.float32)
    o_a = tl.arange(0, DA)
    o_c = i_v * BV + tl.arange(0, BV)
    if HAS_INITIAL:
        p_init = (initial_state + i_n.to(tl.int64) * stride_init_n + i_h * stride_init_h
                  + o_a[:, None] * stride_init_a + o_c[None, :] * stride_init_c)
        running = tl.load(p_init).to(tl.float32)
    else:
        running = tl.zeros([DA, BV], dtype=tl.float32)
    tile = (i_h * DA + o_a[:, None]) * DC + o_c[None, :]
    for jj in range(0, ns - 1):
        if REVERSE:
            j = ns - 1 - jj
        else:
            j = jj
        p_s = seg_states + (first + j).to(tl.int64) * H * DA * DC + tile
        contribution = tl.load(p_s)
        tl.store(p_s, running)
        length = tl.minimum(seg_len, seq_len - j * seg_len)
        running = running * _decay_pow(ld, length) + contribution
    if REVERSE:
        j_last = 0
    else:
        j_last = ns - 1
    tl.store(seg_states + (first + j_last).to(tl.int64) * H * DA * DC + tile, running)


@triton.jit
def lightning_attn_fwd_kernel_output(
    a, b, c, out, log_decay, start_state, final_state, cu_seqlens, seg_offsets,
    T, N, H, seg_len, num_segs, scale, state_in_scale, state_out_scale,
    stride_start_n, stride_start_h, stride_start_a, stride_start_c,
    stride_final_n, stride_final_h, stride_final_a, stride_final_c,
    DA: tl.constexpr, DC: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    HAS_START: tl.constexpr, START_PER_SEGMENT: tl.constexpr, STORE_FINAL: tl.constexpr,
    STATE_DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The scan itself: walk a segment chunk by chunk and write out [*, H, DC] in the dtype of `out`.

    a, b [*, H, DA]; c [*, H, DC]. Per chunk (rows t, columns s of the chunk):
        out = scale * (mask o a b^T) c + state_out_scale * diag(gamma^(t+1)) a S        mask = gamma^(t-s), s <= t
    then S advances (see _chunk_state_update). Backwards the mask is gamma^(s-t), s >= t, and the state weight
    gamma^(L-1-t). start_state holds S at the start of every segment (START_PER_SEGMENT: [S, H, DA, DC]) or of
    every sequence ([N, H, DA, DC]), by strides; final_state receives the state after the sequence's last token
    (first, backwards). Grid (S * H * DC / BV,)."""
    NV: tl.constexpr = DC // BV
    pid = tl.program_id(0)
    i_v = pid % NV
    i_h = (pid // NV) % H
    i_seg = pid // (NV * H)
    i_n, i_s, ns, bos, seq_len = _locate_segment(i_seg, cu_seqlens, seg_offsets, T, seg_len, num_segs, N,
                                                 SEARCH_STEPS, IS_VARLEN)
    if i_s < ns:
        ld = tl.load(log_decay + i_h).to(tl.float32)
        o_t = tl.arange(0, BT)
        o_a = tl.arange(0, DA)
        o_c = i_v * BV + tl.arange(0, BV)
        # The decayed causal mask is the same for every chunk: built once, with the scale folded in.
        if REVERSE:
            dist = o_t[None, :] - o_t[:, None]
        else:
            dist = o_t[:, None] - o_t[None, :]
        mask = tl.where(dist >= 0, _decay_pow(ld, tl.maximum(dist, 0)) * scale, 0.0)

        if HAS_START:
            if START_PER_SEGMENT:
                row = i_seg.to(tl.int64)
            else:
                row = i_n.to(tl.int64)
            p_start = (start_state + row * stride_start_n + i_h * stride_start_h
                       + o_a[:, None] * stride_start_a + o_c[None, :] * stride_start_c)
            state = tl.load(p_start).to(tl.float32)
        else:
            state = tl.zeros([DA, BV], dtype=tl.float32)

        seg_start = i_s * seg_len
        n_chunks = tl.cdiv(tl.minimum(seg_len, seq_len - seg_start), BT)
        for ic in range(0, n_chunks):
            if REVERSE:
                t0 = seg_start + (n_chunks - 1 - ic) * BT
            else:
                t0 = seg_start + ic * BT
            length = tl.minimum(BT, seq_len - t0)
            # 64-bit offset of the chunk's first row; 32-bit offsets within the chunk.
            rows = (bos + t0) * H + i_h
            row_ok = (o_t < length)[:, None]
            ab_offsets = o_t[:, None] * (H * DA) + o_a[None, :]
            c_offsets = o_t[:, None] * (H * DC) + o_c[None, :]
            a_blk = tl.load(a + rows * DA + ab_offsets, mask=row_ok, other=0.0)
            b_blk = tl.load(b + rows * DA + ab_offsets, mask=row_ok, other=0.0)
            c_blk = tl.load(c + rows * DC + c_offsets, mask=row_ok, other=0.0)

            scores = tl.dot(a_blk, tl.trans(b_blk), input_precision=DOT_PRECISION) * mask
            acc = tl.dot(scores.to(c_blk.dtype), c_blk, input_precision=DOT_PRECISION)
            if REVERSE:
                steps = length - 1 - o_t
            else:
                steps = o_t + 1
            row_weight = tl.where(o_t < length, _decay_pow(ld, tl.maximum(steps, 0)), 0.0) * state_out_scale
            if STATE_DOT_FP32:
                inter = tl.dot(a_blk.to(tl.float32), state, input_precision=DOT_PRECISION)
            else:
                inter = tl.dot(a_blk, state.to(a_blk.dtype))
            acc += inter * row_weight[:, None]
            p_o = out + rows * DC + c_offsets
            tl.store(p_o, acc.to(p_o.dtype.element_ty), mask=row_ok)

            state = _chunk_state_update(state, b_blk, c_blk, o_t, length, ld, state_in_scale, REVERSE, DOT_PRECISION)

        if STORE_FINAL:
            if REVERSE:
                is_end = i_s == 0
            else:
                is_end = i_s == ns - 1
            if is_end:
                p_final = (final_state + i_n.to(tl.int64) * stride_final_n + i_h * stride_final_h
                           + o_a[:, None] * stride_final_a + o_c[None, :] * stride_final_c)
                tl.store(p_final, state)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Segments:
    """How the sequences are cut for one launch (a pure function of shapes and the device).

    seg_len: tokens per segment (a multiple of CHUNK), num_segs: segments per sequence (equal-length batches),
    seg_offsets: [N + 1] first segment of every sequence (packed batches), grid_segments: segments launched
    (an upper bound for packed batches; extra programs exit at once), single: one segment per sequence."""
    N: int
    T: int
    seg_len: int
    num_segs: int
    seg_offsets: Optional[Tensor]
    grid_segments: int
    single: bool
    search_steps: int


def _resident_programs(device: torch.device) -> int:
    return PROGRAMS_PER_SM * sm_count(device)


def _plan_segments(T: int, N: int, H: int, DC: int, cu_seqlens: Optional[Tensor], device: torch.device,
                   segment_len: Optional[int]) -> _Segments:
    """Cut sequences so that (segments x heads x column tiles) roughly fills the resident programs.

    T is the padded length (equal-length batch) or the packed token count (cu_seqlens)."""
    tiles = H * (DC // _block_v(DC))
    target = _resident_programs(device)
    if segment_len is not None:
        if segment_len <= 0 or segment_len % CHUNK:
            raise ValueError(f"segment_len must be a positive multiple of {CHUNK}, got {segment_len}")
        seg_len = segment_len
    elif cu_seqlens is None:
        num_segs = max(1, min(target // max(1, N * tiles), triton.cdiv(T, MIN_SEGMENT)))
        seg_len = triton.cdiv(triton.cdiv(max(T, 1), num_segs), CHUNK) * CHUNK
    else:
        seg_len = max(MIN_SEGMENT, triton.cdiv(triton.cdiv(T * tiles, target), CHUNK) * CHUNK)
    if cu_seqlens is None:
        num_segs = max(1, triton.cdiv(T, seg_len))
        return _Segments(N, T, seg_len, num_segs, None, N * num_segs, num_segs == 1, 0)
    if seg_len >= T:  # no packed sequence is longer than the whole row
        return _Segments(N, T, seg_len, 1, None, N, True, 0)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    per_seq = ((lengths + seg_len - 1) // seg_len).clamp_min(1)
    seg_offsets = torch.zeros(N + 1, dtype=torch.int32, device=device)
    seg_offsets[1:] = torch.cumsum(per_seq, 0)
    # Every sequence has at most floor(len / seg_len) + 1 segments, so T // seg_len + N bounds the total.
    return _Segments(N, T, seg_len, 0, seg_offsets, T // seg_len + N, False, max(1, N.bit_length()))


def _block_v(DC: int) -> int:
    return min(BLOCK_V, DC)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs stay exact (no tf32 rounding); fp16 state products run in tf32 (fp16 precision, fp32 range).
    return "ieee" if dtype == torch.float32 else "tf32"


def _segment_start_states(b: Tensor, c: Tensor, log_decay: Tensor, state_in_scale: float,
                          initial: Optional[Tensor], plan: _Segments, cu_seqlens: Optional[Tensor],
                          reverse: bool) -> Tensor:
    """Start state of every segment: [grid_segments, H, DA, DC] fp32 (b [B, T, H, DA], c [B, T, H, DC])."""
    H, DA, DC = b.shape[2], b.shape[3], c.shape[3]
    BV = _block_v(DC)
    seg_states = torch.empty(plan.grid_segments, H, DA, DC, dtype=torch.float32, device=b.device)
    lightning_attn_fwd_kernel_segment_states[(plan.grid_segments * H * (DC // BV),)](
        b, c, log_decay, seg_states, cu_seqlens, plan.seg_offsets,
        plan.T, plan.N, H, plan.seg_len, plan.num_segs, state_in_scale,
        DA=DA, DC=DC, BT=CHUNK, BV=BV, REVERSE=reverse, IS_VARLEN=cu_seqlens is not None,
        SEARCH_STEPS=plan.search_steps, DOT_PRECISION=_dot_precision(b.dtype), num_warps=STATES_WARPS,
        num_stages=STATES_STAGES,
    )
    init_strides = initial.stride() if initial is not None else (0, 0, 0, 0)
    lightning_attn_fwd_kernel_segment_scan[(plan.N * H * (DC // BV),)](
        log_decay, seg_states, initial, cu_seqlens, plan.seg_offsets,
        plan.T, plan.N, H, plan.seg_len, plan.num_segs, *init_strides,
        DA=DA, DC=DC, BV=BV, REVERSE=reverse, IS_VARLEN=cu_seqlens is not None, HAS_INITIAL=initial is not None,
        num_warps=4,
    )
    return seg_states


def _scan(a: Tensor, b: Tensor, c: Tensor, log_decay: Tensor, scale: float, state_in_scale: float,
          state_out_scale: float, start: Optional[Tensor], plan: _Segments, cu_seqlens: Optional[Tensor],
          reverse: bool, final: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """Run the output stage. a, b [B, T, H, DA]; c [B, T, H, DC] -> out [B, T, H, DC] in out_dtype.

    start: per-segment start states (plan not single) or per-sequence ones [N, H, DA, DC] (any strides), or None;
    final: [N, H, DA, DC] (any strides) receives the end state, or None."""
    H, DA, DC = a.shape[2], a.shape[3], c.shape[3]
    BV = _block_v(DC)
    out = torch.empty(c.shape, dtype=out_dtype, device=c.device)
    start_strides = start.stride() if start is not None else (0, 0, 0, 0)
    final_strides = final.stride() if final is not None else (0, 0, 0, 0)
    lightning_attn_fwd_kernel_output[(plan.grid_segments * H * (DC // BV),)](
        a, b, c, out, log_decay, start, final, cu_seqlens, plan.seg_offsets,
        plan.T, plan.N, H, plan.seg_len, plan.num_segs, scale, state_in_scale, state_out_scale,
        *start_strides, *final_strides,
        DA=DA, DC=DC, BT=CHUNK, BV=BV, REVERSE=reverse, IS_VARLEN=cu_seqlens is not None,
        SEARCH_STEPS=plan.search_steps, HAS_START=start is not None, START_PER_SEGMENT=not plan.single,
        STORE_FINAL=final is not None, STATE_DOT_FP32=a.dtype != torch.bfloat16,
        DOT_PRECISION=_dot_precision(a.dtype), num_warps=OUTPUT_WARPS, num_stages=OUTPUT_STAGES,
    )
    return out


def _prepare(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, cu_seqlens: Optional[Tensor],
             segment_len: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], _Segments]:
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(f"lightning_chunk: {reason}")
    B, T, H, _ = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    log_decay = log_decay.to(torch.float32).contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
        plan = _plan_segments(T, cu_seqlens.numel() - 1, H, v.shape[-1], cu_seqlens, q.device, segment_len)
    else:
        plan = _plan_segments(T, B, H, v.shape[-1], None, q.device, segment_len)
    return q, k, v, log_decay, cu_seqlens, plan


def lightning_chunk_fwd(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float,
                        initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], output_final_state: bool,
                        *, segment_len: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Forward of Lightning Attention.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (bf16, fp16 or fp32, one dtype).
        log_decay: [H] float32 <= 0.
        scale: output scale.
        initial_state: [N, H, K, V] float32 or None (zeros).
        cu_seqlens: [N + 1] int offsets of N sequences packed in row 0 (B == 1), or None (N = B).
        output_final_state: also return the state after each sequence's last token.
        segment_len: tokens per parallel segment (a multiple of 64); default chosen from the shapes and device.
    Returns:
        o [B, T, H, V] in q.dtype; final_state [N, H, K, V] float32 or None.
    """
    q, k, v, log_decay, cu_seqlens, plan = _prepare(q, k, v, log_decay, cu_seqlens, segment_len)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    final = torch.empty(plan.N, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    if plan.single:
        start = initial_state
    else:
        start = _segment_start_states(k, v, log_decay, 1.0, initial_state, plan, cu_seqlens, reverse=False)
    o = _scan(q, k, v, log_decay, scale, 1.0, scale, start, plan, cu_seqlens, False, final, q.dtype)
    return o, final


def lightning_chunk_bwd(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float,
                        initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], do: Tensor,
                        dfinal_state: Optional[Tensor], *, segment_len: Optional[int] = None
                        ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Backward of Lightning Attention (inputs as in `lightning_chunk_fwd`).

    Args:
        do: [B, T, H, V] gradient of o.
        dfinal_state: [N, H, K, V] gradient of final_state, or None (zero).
    Returns:
        dq [B, T, H, K], dk [B, T, H, K], dv [B, T, H, V] in q.dtype; d initial_state [N, H, K, V] float32
        (None when initial_state is None).
    """
    q, k, v, log_decay, cu_seqlens, plan_v = _prepare(q, k, v, log_decay, cu_seqlens, segment_len)
    do = do.to(q.dtype).contiguous()
    B, T, H, K = q.shape
    V = v.shape[3]
    if K == V:
        plan_k = plan_v
    elif cu_seqlens is None:
        plan_k = _plan_segments(T, B, H, K, None, q.device, segment_len)
    else:
        plan_k = _plan_segments(T, cu_seqlens.numel() - 1, H, K, cu_seqlens, q.device, segment_len)

    # dq: forwards scan of (do, v, k) over the transposed forward state.
    initial_t = initial_state.transpose(-1, -2) if initial_state is not None else None
    if plan_k.single:
        start_t = initial_t
    else:
        start_t = _segment_start_states(v, k, log_decay, 1.0, initial_t, plan_k, cu_seqlens, reverse=False)
    dq = _scan(do, v, k, log_decay, scale, 1.0, scale, start_t, plan_k, cu_seqlens, False, None, q.dtype)

    # dv and dk: backwards scans over the adjoint state dS [K, V] and its transpose.
    if plan_v.single:
        adjoint_v = dfinal_state
    else:
        adjoint_v = _segment_start_states(q, do, log_decay, scale, dfinal_state, plan_v, cu_seqlens, reverse=True)
    dinitial = (torch.empty(plan_v.N, H, K, V, dtype=torch.float32, device=q.device)
                if initial_state is not None else None)
    dv = _scan(k, q, do, log_decay, scale, scale, 1.0, adjoint_v, plan_v, cu_seqlens, True, dinitial, q.dtype)

    if plan_k is plan_v:
        adjoint_k = adjoint_v.transpose(-1, -2) if adjoint_v is not None else None
    else:
        dfinal_t = dfinal_state.transpose(-1, -2) if dfinal_state is not None else None
        adjoint_k = (dfinal_t if plan_k.single else
                     _segment_start_states(do, q, log_decay, scale, dfinal_t, plan_k, cu_seqlens, reverse=True))
    dk = _scan(v, do, q, log_decay, scale, scale, 1.0, adjoint_k, plan_k, cu_seqlens, True, None, q.dtype)
    return dq, dk, dv, dinitial
