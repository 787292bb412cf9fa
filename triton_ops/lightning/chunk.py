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
and the adjoint left after the first token is d initial_state. The dq scan starts its segments from the forward's
start states, transposed: `lightning_chunk_train_fwd` returns them (and, for packed batches, its chunk tables) for
`lightning_chunk_bwd` to reuse.

The decay is a constant per head, so the intra-chunk mask gamma^(t-s) is built once per program (no cumulative
decay tensors). Time is walked sequentially in chunks of BT tokens by one program per (sequence segment, head,
BV columns of the state), the fp32 state staying in registers. When the batch has too few (sequence, head,
column tile) triples to fill the GPU, each sequence is cut into segments of SEG_LEN tokens:
    stage segment_states: every segment's own state contribution, in parallel;
    stage segment_scan:   a short sequential pass over segments turns them into each segment's start state;
    stage output:         every segment walks its chunks from its start state, in parallel.
With one segment per sequence only the output stage runs (one kernel, inputs read once).

Packed batches (cu_seqlens) are balanced over a flat list of chunks instead: every sequence is cut into chunks of
BT tokens, all sequences' chunks are laid end to end, and that list is cut into ranges of about equal chunk counts
(whole state segments of SEGMENT_CHUNKS chunks). One output program walks a range in one loop that resets the state
where a sequence starts, so short sequences share a program (one start-up for many of them), and long ones are
spread over several. Only a range that begins inside a sequence needs a start state: the segment stages compute just the
segments of the sequence before that cut. Device-side tables (two small kernels, no host sync) describe the chunks
and ranges, so the launch shapes depend on the token count and sequence count only; a backward reuses its forward's.
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
SEGMENT_CHUNKS = MIN_SEGMENT // CHUNK  # packed batches: chunks per state segment (ranges are whole segments)
TABLE_BLOCK = 1024  # sequences or chunks per program of the packed-table kernels
# Launch configuration (module constants so that benchmarks can compare alternatives). Swept on an H200
# (benches/NOTES.md): BV=64 with 4 warps and 2 stages is fastest at every shape (two programs per SM; an offline
# sm_90a compile shows 255 registers, no spills, ~90 KB of shared memory); 3 stages cost ~20%, 8 warps or BV=128
# ~2x, BV=32 ~50%.
BLOCK_V = 64  # BV: state columns per program; the [K, BV] fp32 state takes K * BV / (32 * warps) registers
PROGRAMS_PER_SM = 2  # output-stage programs resident per SM; segmenting aims at filling exactly these
OUTPUT_WARPS, OUTPUT_STAGES = 4, 2
STATES_WARPS, STATES_STAGES = 4, 3
SCAN_ROWS = 32  # BR: state rows per segment-scan program (four [32, 64] fp32 tiles in flight per thread block)


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
def _search_sorted(offsets, i, N, SEARCH_STEPS: tl.constexpr):
    """Largest n in [0, N) with offsets[n] <= i, for strictly increasing offsets [N + 1] (i may be a block)."""
    lo = i * 0
    hi = lo + N
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(offsets + mid) <= i
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _state_tile(states, n, i_h, o_a, o_c, stride_n, stride_h, stride_a, stride_c):
    """Pointers to rows o_a, columns o_c of state n (64-bit), head i_h of a [*, H, DA, DC] tensor given by strides."""
    return states + n.to(tl.int64) * stride_n + i_h * stride_h + o_a[:, None] * stride_a + o_c[None, :] * stride_c


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
def _decayed_causal_mask(log_decay, o_t, scale, REVERSE: tl.constexpr):
    """The [BT, BT] intra-chunk mask scale * gamma^|t-s| on the causal side (s <= t; s >= t backwards)."""
    if REVERSE:
        dist = o_t[None, :] - o_t[:, None]
    else:
        dist = o_t[:, None] - o_t[None, :]
    return tl.where(dist >= 0, _decay_pow(log_decay, tl.maximum(dist, 0)) * scale, 0.0)


@triton.jit
def _chunk_output(state, a, b, c, out, rows, length, mask, log_decay, o_t, o_a, o_c, state_in_scale,
                  state_out_scale, H, DA: tl.constexpr, DC: tl.constexpr, REVERSE: tl.constexpr,
                  STATE_DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One chunk of the scan: write its `length` output rows, return the state advanced past it.

    rows = 64-bit index of the chunk's first row in the [tokens * H] row axis (offsets within the chunk stay
    32-bit). Per chunk (rows t, columns s): out = (mask o a b^T) c + state_out_scale * diag(gamma^(t+1)) a S
    (backwards the state weight is gamma^(L-1-t))."""
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
    row_weight = tl.where(o_t < length, _decay_pow(log_decay, tl.maximum(steps, 0)), 0.0) * state_out_scale
    if STATE_DOT_FP32:
        inter = tl.dot(a_blk.to(tl.float32), state, input_precision=DOT_PRECISION)
    else:
        inter = tl.dot(a_blk, state.to(a_blk.dtype))
    acc += inter * row_weight[:, None]
    p_o = out + rows * DC + c_offsets
    tl.store(p_o, acc.to(p_o.dtype.element_ty), mask=row_ok)
    return _chunk_state_update(state, b_blk, c_blk, o_t, length, log_decay, state_in_scale, REVERSE, DOT_PRECISION)


@triton.jit
def _cut_bounds(first_chunk, ns, range_chunks, seg_chunks, REVERSE: tl.constexpr):
    """Packed batches: which segments of a sequence (first chunk `first_chunk`, ns segments) the segment stages
    need. Forwards: segments [0, j_stop) precede the sequence's last range cut; backwards: segments [j_stop, ns)
    follow its first cut. No cut inside the sequence gives an empty set."""
    last_start = first_chunk + (ns - 1) * seg_chunks
    if REVERSE:
        cut = (first_chunk // range_chunks + 1) * range_chunks
        j_stop = tl.where(cut <= last_start, tl.cdiv(cut - first_chunk, seg_chunks), ns)
    else:
        cut = (last_start // range_chunks) * range_chunks
        j_stop = tl.where(cut > first_chunk, tl.cdiv(cut - first_chunk, seg_chunks), 0)
    return j_stop


@triton.jit
def _packed_counts(cu_seqlens, n, ok, BT: tl.constexpr, SEG_CHUNKS: tl.constexpr):
    """Chunks and segments of sequences n (zero where not ok; an empty sequence still gets one chunk, so that
    its final state is written)."""
    length = tl.load(cu_seqlens + n + 1, mask=ok, other=0) - tl.load(cu_seqlens + n, mask=ok, other=0)
    chunks = tl.where(ok, tl.maximum(tl.cdiv(length.to(tl.int32), BT), 1), 0)
    return chunks, tl.cdiv(chunks, SEG_CHUNKS)


@triton.jit
def lightning_attn_packed_offsets_kernel(
    cu_seqlens, chunk_offsets, seg_offsets, range_table, cut_seqs, cut_fwd, cut_rev, packed_meta,
    N, num_ranges, fixed_range_chunks,
    SEG_CHUNKS: tl.constexpr, BT: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program, two passes over the sequences.

    First: chunk and segment offsets [N + 1] (prefix sums), the chunks per range, packed_meta[0:2] = (chunks,
    chunks per range), and every range-table entry set to the chunk count (the tables kernel overwrites the entries
    of ranges that exist). Second: the sequences a range starts inside ("cut" sequences, at most ranges - 1):
    cut_seqs [k] = the k-th one, cut_fwd / cut_rev [k] = its first entry in the flat lists of segments the forwards
    / backwards segment stages need (`_cut_bounds`), entry [n_cut] = the list lengths; packed_meta[2] = n_cut."""
    o = tl.arange(0, BLOCK)
    chunks_before = N * 0
    segs_before = N * 0
    tl.store(chunk_offsets + o, o * 0, mask=o == 0)
    tl.store(seg_offsets + o, o * 0, mask=o == 0)
    for start in range(0, N, BLOCK):
        n = start + o
        ok = n < N
        chunks, segs = _packed_counts(cu_seqlens, n, ok, BT, SEG_CHUNKS)
        tl.store(chunk_offsets + n + 1, chunks_before + tl.cumsum(chunks, 0), mask=ok)
        tl.store(seg_offsets + n + 1, segs_before + tl.cumsum(segs, 0), mask=ok)
        chunks_before += tl.sum(chunks, 0)
        segs_before += tl.sum(segs, 0)
    if fixed_range_chunks > 0:
        range_chunks = chunks_before * 0 + fixed_range_chunks
    else:
        range_chunks = tl.maximum(tl.cdiv(chunks_before, num_ranges), SEG_CHUNKS)
    for start in range(0, num_ranges + 1, BLOCK):
        p = start + o
        tl.store(range_table + p, chunks_before + p * 0, mask=p <= num_ranges)

    # The second pass recomputes the offsets instead of reading back this program's own stores.
    first_chunk_before = N * 0
    n_cut = N * 0
    fwd_total = N * 0
    rev_total = N * 0
    for start in range(0, N, BLOCK):
        n = start + o
        ok = n < N
        chunks, segs = _packed_counts(cu_seqlens, n, ok, BT, SEG_CHUNKS)
        first_chunk = first_chunk_before + tl.cumsum(chunks, 0) - chunks
        j_fwd = _cut_bounds(first_chunk, segs, range_chunks, SEG_CHUNKS, False)
        j_rev = _cut_bounds(first_chunk, segs, range_chunks, SEG_CHUNKS, True)
        cut = ok & (j_fwd > 0)
        cut_count = cut.to(tl.int32)
        fwd = tl.where(cut, j_fwd, 0)
        rev = tl.where(cut, segs - j_rev, 0)
        k = n_cut + tl.cumsum(cut_count, 0) - cut_count
        tl.store(cut_seqs + k, n, mask=cut)
        tl.store(cut_fwd + k, fwd_total + tl.cumsum(fwd, 0) - fwd, mask=cut)
        tl.store(cut_rev + k, rev_total + tl.cumsum(rev, 0) - rev, mask=cut)
        first_chunk_before += tl.sum(chunks, 0)
        n_cut += tl.sum(cut_count, 0)
        fwd_total += tl.sum(fwd, 0)
        rev_total += tl.sum(rev, 0)
    tl.store(cut_fwd + n_cut + o, fwd_total + o * 0, mask=o == 0)
    tl.store(cut_rev + n_cut + o, rev_total + o * 0, mask=o == 0)
    tl.store(packed_meta + o, tl.where(o == 0, chunks_before, tl.where(o == 1, range_chunks, n_cut)), mask=o < 3)


@triton.jit
def lightning_attn_packed_tables_kernel(
    cu_seqlens, chunk_offsets, seg_offsets, chunk_table, range_table, packed_meta, N,
    SEG_CHUNKS: tl.constexpr, BT: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Fill chunk_table [chunks, 4] int32 = (first token, real rows, sequence, flags: 1 = the sequence's first
    chunk, 2 = its last) and range_table [ranges + 1] = first chunk of every range (a range starts at the first
    segment whose first chunk reaches a multiple of the range size). Grid over max(chunks, segments) / BLOCK."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    num_chunks = tl.load(packed_meta)
    range_chunks = tl.load(packed_meta + 1)
    num_segs = tl.load(seg_offsets + N)

    n = _search_sorted(chunk_offsets, i, N, SEARCH_STEPS)
    bos = tl.load(cu_seqlens + n).to(tl.int32)
    seq_len = tl.load(cu_seqlens + n + 1).to(tl.int32) - bos
    t0 = (i - tl.load(chunk_offsets + n)) * BT
    flags = (t0 == 0).to(tl.int32) + 2 * (t0 + BT >= seq_len).to(tl.int32)
    is_chunk = i < num_chunks
    tl.store(chunk_table + 4 * i, bos + t0, mask=is_chunk)
    tl.store(chunk_table + 4 * i + 1, tl.minimum(tl.maximum(seq_len - t0, 0), BT), mask=is_chunk)
    tl.store(chunk_table + 4 * i + 2, n, mask=is_chunk)
    tl.store(chunk_table + 4 * i + 3, flags, mask=is_chunk)

    n = _search_sorted(seg_offsets, i, N, SEARCH_STEPS)
    j = i - tl.load(seg_offsets + n)
    seq_first_chunk = tl.load(chunk_offsets + n)
    seg_first_chunk = seq_first_chunk + j * SEG_CHUNKS
    # The previous segment: in the same sequence, or the last (possibly short) one of the sequence before.
    prev_chunks = seq_first_chunk - tl.load(chunk_offsets + tl.maximum(n - 1, 0))
    prev_first_chunk = tl.where(j > 0, seg_first_chunk - SEG_CHUNKS,
                                seq_first_chunk - ((prev_chunks - 1) % SEG_CHUNKS + 1))
    starts_range = (i == 0) | (seg_first_chunk // range_chunks > prev_first_chunk // range_chunks)
    tl.store(range_table + seg_first_chunk // range_chunks, seg_first_chunk, mask=(i < num_segs) & starts_range)


@triton.jit
def _segment_contribution(b, c, log_decay, bos, seq_len, seg_start, seg_len, i_h, o_c, H, state_in_scale,
                          DA: tl.constexpr, DC: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                          REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """State contribution of one segment on its own (zero start state): [DA, BV] fp32."""
    ld = tl.load(log_decay + i_h).to(tl.float32)
    o_t = tl.arange(0, BT)
    o_a = tl.arange(0, DA)
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
    return state


@triton.jit
def lightning_attn_fwd_kernel_segment_states(
    b, c, log_decay, seg_states, cu_seqlens, seg_offsets, chunk_offsets, cut_seqs, cut_first, packed_meta,
    T, H, seg_len, num_segs, state_in_scale,
    DA: tl.constexpr, DC: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr, CUT_SEARCH_STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """State contribution of segments on their own, into seg_states [slots, H, DA, DC] fp32.

    b [*, H, DA], c [*, H, DC] (flattened tokens). Equal-length batches: one program per (segment, head, BV
    columns), slot = segment; forwards the last segment of a sequence is skipped (nothing follows it), backwards
    the first. Packed: the programs share the work items (needed segment, head, BV columns) of the cut sequences
    (cut_first = the forwards or backwards list offsets of `lightning_attn_packed_offsets_kernel`); slot = the
    segment's first chunk // segment chunks (distinct for needed segments: all but a sequence's last are whole)."""
    NV: tl.constexpr = DC // BV
    if IS_VARLEN:
        seg_chunks = seg_len // BT
        range_chunks = tl.load(packed_meta + 1)
        n_cut = tl.load(packed_meta + 2)
        for w in range(tl.program_id(0), tl.load(cut_first + n_cut) * (H * NV), tl.num_programs(0)):
            i_v = w % NV
            i_h = (w // NV) % H
            item = w // (NV * H)
            k = _search_sorted(cut_first, item, n_cut, CUT_SEARCH_STEPS)
            i_n = tl.load(cut_seqs + k)
            first_chunk = tl.load(chunk_offsets + i_n)
            i_s = item - tl.load(cut_first + k)
            if REVERSE:
                ns = tl.load(seg_offsets + i_n + 1) - tl.load(seg_offsets + i_n)
                i_s += _cut_bounds(first_chunk, ns, range_chunks, seg_chunks, True)
            bos = tl.load(cu_seqlens + i_n).to(tl.int64)
            seq_len = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
            o_c = i_v * BV + tl.arange(0, BV)
            state = _segment_contribution(b, c, log_decay, bos, seq_len, i_s * seg_len, seg_len, i_h, o_c, H,
                                          state_in_scale, DA, DC, BT, BV, REVERSE, DOT_PRECISION)
            slot = (first_chunk + i_s * seg_chunks) // seg_chunks
            tl.store(_state_tile(seg_states, slot, i_h, tl.arange(0, DA), o_c, H * DA * DC, DA * DC, DC, 1), state)
    else:
        pid = tl.program_id(0)
        i_v = pid % NV
        i_h = (pid // NV) % H
        i_seg = pid // (NV * H)
        i_s = i_seg % num_segs
        if REVERSE:
            needed = i_s > 0
        else:
            needed = i_s < num_segs - 1
        if needed:
            o_c = i_v * BV + tl.arange(0, BV)
            state = _segment_contribution(b, c, log_decay, (i_seg // num_segs).to(tl.int64) * T, T, i_s * seg_len,
                                          seg_len, i_h, o_c, H, state_in_scale, DA, DC, BT, BV, REVERSE,
                                          DOT_PRECISION)
            tl.store(_state_tile(seg_states, i_seg, i_h, tl.arange(0, DA), o_c, H * DA * DC, DA * DC, DC, 1), state)


@triton.jit
def _scan_segment(step, ns, REVERSE: tl.constexpr):
    """Segment folded at `step` of a sequence's scan (backwards the scan starts at the last segment)."""
    if REVERSE:
        return ns - 1 - step
    else:
        return step


@triton.jit
def _scan_contribution(seg_states, step, n_steps, ns, first_chunk, seg_chunks, tile, tile_zero, slot_size,
                       REVERSE: tl.constexpr):
    """Load the contribution folded at `step` (zeros past n_steps). Packed slots are first chunk // segment chunks;
    equal-length ones are indexed by segment (first_chunk = the sequence's first segment, seg_chunks = 1)."""
    slot = (first_chunk + _scan_segment(step, ns, REVERSE) * seg_chunks) // seg_chunks
    return tl.load(seg_states + slot.to(tl.int64) * slot_size + tile, mask=(tile_zero + step) < n_steps, other=0.0)


@triton.jit
def _scan_fold(running, contribution, step, n_steps, ns, seq_len, seg_len, ld, starts, tile, slot_size, first_chunk,
               seg_chunks, range_chunks, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr):
    """One step of a sequence's scan. Equal-length: store the segment's start state in place, then fold. Packed:
    fold, then store the state where the next segment starts a range."""
    if step < n_steps:
        j = _scan_segment(step, ns, REVERSE)
        if IS_VARLEN:
            running = running * _decay_pow(ld, tl.minimum(seg_len, seq_len - j * seg_len)) + contribution
            if REVERSE:
                next_chunk = first_chunk + j * seg_chunks  # the state now enters segment j - 1
            else:
                next_chunk = first_chunk + (j + 1) * seg_chunks
            if next_chunk // range_chunks > (next_chunk - seg_chunks) // range_chunks:
                tl.store(starts + (next_chunk // range_chunks).to(tl.int64) * slot_size + tile, running)
        else:
            tl.store(starts + (first_chunk + j).to(tl.int64) * slot_size + tile, running)
            running = running * _decay_pow(ld, tl.minimum(seg_len, seq_len - j * seg_len)) + contribution
    return running


@triton.jit
def lightning_attn_fwd_kernel_segment_scan(
    log_decay, seg_states, starts, initial_state, cu_seqlens, seg_offsets, chunk_offsets, cut_seqs, packed_meta,
    T, H, seg_len, num_segs,
    stride_init_n, stride_init_h, stride_init_a, stride_init_c,
    DA: tl.constexpr, DC: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_INITIAL: tl.constexpr,
):
    """Turn segment contributions into start states, one sequence per program and [BR, BV] tile of the state (the
    scan is element-wise). Grid (sequences * H * DA / BR * DC / BV,).

    Equal-length batches: starts is seg_states itself, rewritten in place with every segment's start state (start
    of the first segment, the last backwards, = the initial state; each next start = gamma^len * previous start +
    previous contribution). Packed: programs walk the cut sequences (the grid covers the bound ranges - 1); starts
    [ranges + 1, H, DA, DC] receives, for every range that begins inside the sequence, the state at its first chunk
    (forwards) or after its last chunk (backwards, stored at the next range's index). initial_state [N, H, DA, DC]
    by strides (it may be a transposed view). The loop loads four contributions before it folds them: the loads
    do not wait on each other, only the folds do."""
    NR: tl.constexpr = DA // BR
    NV: tl.constexpr = DC // BV
    pid = tl.program_id(0)
    i_r = pid % NR
    i_v = (pid // NR) % NV
    i_h = (pid // (NR * NV)) % H
    k = pid // (NR * NV * H)
    if IS_VARLEN:
        active = k < tl.load(packed_meta + 2)
        i_n = tl.load(cut_seqs + k, mask=active, other=0)
    else:
        active = k >= 0
        i_n = k
    if active:
        ld = tl.load(log_decay + i_h).to(tl.float32)
        o_a = i_r * BR + tl.arange(0, BR)
        o_c = i_v * BV + tl.arange(0, BV)
        if HAS_INITIAL:
            p_init = _state_tile(initial_state, i_n, i_h, o_a, o_c, stride_init_n, stride_init_h, stride_init_a,
                                 stride_init_c)
            running = tl.load(p_init).to(tl.float32)
        else:
            running = tl.zeros([BR, BV], dtype=tl.float32)
        tile = (i_h * DA + o_a[:, None]) * DC + o_c[None, :]
        tile_zero = o_a[:, None] * 0 + o_c[None, :] * 0
        slot_size = H * DA * DC
        if IS_VARLEN:
            ns = tl.load(seg_offsets + i_n + 1) - tl.load(seg_offsets + i_n)
            seq_len = (tl.load(cu_seqlens + i_n + 1) - tl.load(cu_seqlens + i_n)).to(tl.int32)
            seg_chunks = seg_len // BT
            first_chunk = tl.load(chunk_offsets + i_n)
            range_chunks = tl.load(packed_meta + 1)
            j_stop = _cut_bounds(first_chunk, ns, range_chunks, seg_chunks, REVERSE)
            if REVERSE:
                n_steps = ns - j_stop
            else:
                n_steps = j_stop
        else:
            ns = num_segs
            seq_len = T
            seg_chunks = 1
            first_chunk = i_n * num_segs
            range_chunks = 1
            n_steps = num_segs - 1
        for step in range(0, n_steps, 4):
            c0 = _scan_contribution(seg_states, step, n_steps, ns, first_chunk, seg_chunks, tile, tile_zero,
                                    slot_size, REVERSE)
            c1 = _scan_contribution(seg_states, step + 1, n_steps, ns, first_chunk, seg_chunks, tile, tile_zero,
                                    slot_size, REVERSE)
            c2 = _scan_contribution(seg_states, step + 2, n_steps, ns, first_chunk, seg_chunks, tile, tile_zero,
                                    slot_size, REVERSE)
            c3 = _scan_contribution(seg_states, step + 3, n_steps, ns, first_chunk, seg_chunks, tile, tile_zero,
                                    slot_size, REVERSE)
            running = _scan_fold(running, c0, step, n_steps, ns, seq_len, seg_len, ld, starts, tile, slot_size,
                                 first_chunk, seg_chunks, range_chunks, IS_VARLEN, REVERSE)
            running = _scan_fold(running, c1, step + 1, n_steps, ns, seq_len, seg_len, ld, starts, tile, slot_size,
                                 first_chunk, seg_chunks, range_chunks, IS_VARLEN, REVERSE)
            running = _scan_fold(running, c2, step + 2, n_steps, ns, seq_len, seg_len, ld, starts, tile, slot_size,
                                 first_chunk, seg_chunks, range_chunks, IS_VARLEN, REVERSE)
            running = _scan_fold(running, c3, step + 3, n_steps, ns, seq_len, seg_len, ld, starts, tile, slot_size,
                                 first_chunk, seg_chunks, range_chunks, IS_VARLEN, REVERSE)
        if not IS_VARLEN:
            if REVERSE:
                j_last = 0
            else:
                j_last = num_segs - 1
            tl.store(starts + (first_chunk + j_last).to(tl.int64) * slot_size + tile, running)


@triton.jit
def lightning_attn_fwd_kernel_output(
    a, b, c, out, log_decay, start_state, final_state,
    T, H, seg_len, num_segs, scale, state_in_scale, state_out_scale,
    stride_start_n, stride_start_h, stride_start_a, stride_start_c,
    stride_final_n, stride_final_h, stride_final_a, stride_final_c,
    DA: tl.constexpr, DC: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
    HAS_START: tl.constexpr, START_PER_SEGMENT: tl.constexpr, STORE_FINAL: tl.constexpr,
    STATE_DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The scan itself over an equal-length batch: walk a segment chunk by chunk (`_chunk_output`) and write out
    [*, H, DC] in the dtype of `out`. a, b [*, H, DA]; c [*, H, DC]. start_state holds S at the start of every
    segment (START_PER_SEGMENT: [S, H, DA, DC]) or of every sequence ([N, H, DA, DC]), by strides; final_state
    receives the state after the sequence's last token (first, backwards). Grid (S * H * DC / BV,)."""
    NV: tl.constexpr = DC // BV
    pid = tl.program_id(0)
    i_v = pid % NV
    i_h = (pid // NV) % H
    i_seg = pid // (NV * H)
    i_n = i_seg // num_segs
    i_s = i_seg % num_segs
    bos = i_n.to(tl.int64) * T
    ld = tl.load(log_decay + i_h).to(tl.float32)
    o_t = tl.arange(0, BT)
    o_a = tl.arange(0, DA)
    o_c = i_v * BV + tl.arange(0, BV)
    # The decayed causal mask is the same for every chunk: built once, with the scale folded in.
    mask = _decayed_causal_mask(ld, o_t, scale, REVERSE)

    if HAS_START:
        if START_PER_SEGMENT:
            row = i_seg
        else:
            row = i_n
        p_start = _state_tile(start_state, row, i_h, o_a, o_c, stride_start_n, stride_start_h, stride_start_a,
                              stride_start_c)
        state = tl.load(p_start).to(tl.float32)
    else:
        state = tl.zeros([DA, BV], dtype=tl.float32)

    seg_start = i_s * seg_len
    n_chunks = tl.cdiv(tl.minimum(seg_len, T - seg_start), BT)
    for ic in range(0, n_chunks):
        if REVERSE:
            t0 = seg_start + (n_chunks - 1 - ic) * BT
        else:
            t0 = seg_start + ic * BT
        state = _chunk_output(state, a, b, c, out, (bos + t0) * H + i_h, tl.minimum(BT, T - t0), mask, ld, o_t, o_a,
                              o_c, state_in_scale, state_out_scale, H, DA, DC, REVERSE, STATE_DOT_FP32,
                              DOT_PRECISION)

    if STORE_FINAL:
        if REVERSE:
            is_end = i_s == 0
        else:
            is_end = i_s == num_segs - 1
        if is_end:
            p_final = _state_tile(final_state, i_n, i_h, o_a, o_c, stride_final_n, stride_final_h, stride_final_a,
                                  stride_final_c)
            tl.store(p_final, state)


@triton.jit
def _chunk_entry(chunk_table, chunk):
    """(first token, real rows, sequence, flags) of one chunk of a packed batch."""
    p = chunk_table + 4 * chunk
    return tl.load(p), tl.load(p + 1), tl.load(p + 2).to(tl.int64), tl.load(p + 3)


@triton.jit
def lightning_attn_fwd_kernel_output_packed(
    a, b, c, out, log_decay, range_states, initial_state, final_state, chunk_table, range_table,
    H, scale, state_in_scale, state_out_scale,
    stride_range_n, stride_range_h, stride_range_a, stride_range_c,
    stride_init_n, stride_init_h, stride_init_a, stride_init_c,
    stride_final_n, stride_final_h, stride_final_a, stride_final_c,
    DA: tl.constexpr, DC: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
    HAS_RANGE_STATES: tl.constexpr, HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr,
    STATE_DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The scan over a packed batch: one program per (range of chunks, head, BV columns) walks its chunks in one
    loop (backwards: last to first). Where a sequence opens (its first chunk; its last, backwards) the state
    becomes its initial state (or zeros); where it closes, the state goes to final_state. A range that opens inside
    a sequence starts from range_states [ranges + 1, H, DA, DC] (entry p forwards, p + 1 backwards).
    initial_state / final_state [N, H, DA, DC] by strides. Grid (ranges * H * DC / BV,)."""
    NV: tl.constexpr = DC // BV
    pid = tl.program_id(0)
    i_v = pid % NV
    i_h = (pid // NV) % H
    i_p = pid // (NV * H)
    c_begin = tl.load(range_table + i_p)
    c_end = tl.load(range_table + i_p + 1)
    if c_begin < c_end:
        ld = tl.load(log_decay + i_h).to(tl.float32)
        o_t = tl.arange(0, BT)
        o_a = tl.arange(0, DA)
        o_c = i_v * BV + tl.arange(0, BV)
        mask = _decayed_causal_mask(ld, o_t, scale, REVERSE)
        if REVERSE:
            opens_flag, closes_flag, edge, entry, step = 2, 1, c_end - 1, i_p + 1, -1
        else:
            opens_flag, closes_flag, edge, entry, step = 1, 2, c_begin, i_p, 1
        # The table entry of the next chunk is loaded one iteration ahead: the chunk's loads depend on its first
        # token, and a load issued in the loop body would put a dependent round trip in front of every chunk.
        tok_next, length_next, seq_next, flags_next = _chunk_entry(chunk_table, edge)
        state = tl.zeros([DA, BV], dtype=tl.float32)
        if HAS_RANGE_STATES:
            if (flags_next & opens_flag) == 0:
                p_range = _state_tile(range_states, entry, i_h, o_a, o_c, stride_range_n, stride_range_h,
                                      stride_range_a, stride_range_c)
                state = tl.load(p_range)
        # Sequence opens and closes are scalar branches: a tile-shaped masked load or store in every iteration
        # (most of them masked off) made packed calls with initial or final states ~1.9x slower (benches/NOTES.md).
        for i in range(0, c_end - c_begin):
            tok, length, seq, flags = tok_next, length_next, seq_next, flags_next
            ahead = tl.minimum(tl.maximum(edge + step * (i + 1), c_begin), c_end - 1)
            tok_next, length_next, seq_next, flags_next = _chunk_entry(chunk_table, ahead)
            if (flags & opens_flag) != 0:
                if HAS_INITIAL:
                    p_init = _state_tile(initial_state, seq, i_h, o_a, o_c, stride_init_n, stride_init_h,
                                         stride_init_a, stride_init_c)
                    state = tl.load(p_init).to(tl.float32)
                else:
                    state = tl.zeros([DA, BV], dtype=tl.float32)
            state = _chunk_output(state, a, b, c, out, tok.to(tl.int64) * H + i_h, length, mask, ld, o_t, o_a, o_c,
                                  state_in_scale, state_out_scale, H, DA, DC, REVERSE, STATE_DOT_FP32,
                                  DOT_PRECISION)
            if STORE_FINAL:
                if (flags & closes_flag) != 0:
                    p_final = _state_tile(final_state, seq, i_h, o_a, o_c, stride_final_n, stride_final_h,
                                          stride_final_a, stride_final_c)
                    tl.store(p_final, state)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Segments:
    """How an equal-length batch is cut for one launch (a pure function of shapes and the device).

    seg_len: tokens per segment (a multiple of CHUNK), num_segs: segments per sequence."""
    N: int
    T: int
    seg_len: int
    num_segs: int

    @property
    def single(self) -> bool:
        """One segment per sequence: only the output stage runs."""
        return self.num_segs == 1


@dataclass(frozen=True)
class _Packed:
    """How a packed batch is cut (see the module docstring): device tables plus the host-side bounds that size the
    launches. seg_len: tokens per state segment; ranges: output ranges launched (the tables may leave the last ones
    empty); max_chunks: bound on the chunk count (T // CHUNK + N)."""
    N: int
    T: int
    seg_len: int
    ranges: int
    max_chunks: int
    cu_seqlens: Tensor
    tables: Tensor  # the int32 buffer all the tables below are views of
    chunk_table: Tensor  # [max_chunks, 4] (first token, real rows, sequence, flags); first, so 16-byte aligned
    chunk_offsets: Tensor  # [N + 1] first chunk of every sequence
    seg_offsets: Tensor  # [N + 1] first segment of every sequence
    range_table: Tensor  # [ranges + 1] first chunk of every range; the chunk count past the last range
    cut_seqs: Tensor  # [ranges] the sequences a range starts inside
    cut_fwd: Tensor  # [ranges + 1] offsets of their segments in the forwards segment-stage work list
    cut_rev: Tensor  # [ranges + 1] the same for the backwards stages
    meta: Tensor  # [3] (chunks, chunks per range, cut sequences)

    @property
    def single(self) -> bool:
        """One range: no range starts inside a sequence, so the segment stages are skipped."""
        return self.ranges == 1


def _resident_programs(device: torch.device) -> int:
    return PROGRAMS_PER_SM * sm_count(device)


def _checked_segment_len(segment_len: int) -> int:
    if segment_len <= 0 or segment_len % CHUNK:
        raise ValueError(f"segment_len must be a positive multiple of {CHUNK}, got {segment_len}")
    return segment_len


def _plan_segments(T: int, N: int, H: int, DC: int, device: torch.device, segment_len: Optional[int]) -> _Segments:
    """Cut N sequences of T tokens so that (segments x heads x column tiles) roughly fills the resident programs."""
    if segment_len is not None:
        seg_len = _checked_segment_len(segment_len)
    else:
        tiles = H * (DC // _block_v(DC))
        num_segs = max(1, min(_resident_programs(device) // max(1, N * tiles), triton.cdiv(T, MIN_SEGMENT)))
        seg_len = triton.cdiv(triton.cdiv(max(T, 1), num_segs), CHUNK) * CHUNK
    num_segs = max(1, triton.cdiv(T, seg_len))
    return _Segments(N, T, seg_len, num_segs)


def _packed_ranges(T: int, N: int, H: int, DC: int, device: torch.device,
                   segment_len: Optional[int]) -> tuple[int, int, int, int]:
    """The host-side bounds of a packed plan: (max_chunks, ranges, range_chunks, seg_chunks). By default the chunks
    are shared by as many ranges as fill the resident programs with H x column-tile programs each (range_chunks = 0:
    the tables kernel chooses max(SEGMENT_CHUNKS, ceil(chunks / ranges)) on the device); segment_len fixes the range
    size instead (segment_len / CHUNK chunks)."""
    max_chunks = T // CHUNK + N  # sum of ceil(len / CHUNK), an empty sequence counting one chunk
    if segment_len is not None:
        range_chunks = _checked_segment_len(segment_len) // CHUNK
        seg_chunks = min(SEGMENT_CHUNKS, range_chunks)  # a segment never spans two range starts
        return max_chunks, triton.cdiv(max_chunks, range_chunks), range_chunks, seg_chunks
    ranges = max(1, _resident_programs(device) // (H * (DC // _block_v(DC))))
    return max_chunks, ranges, 0, SEGMENT_CHUNKS


def _packed_table_sizes(N: int, max_chunks: int, ranges: int) -> list[int]:
    """Lengths of the int32 tables of a packed plan, in the order `_Packed` lists them (one buffer holds all)."""
    return [4 * max_chunks, N + 1, N + 1, ranges + 1, ranges, ranges + 1, ranges + 1, 3]


def _described(t: Tensor) -> str:
    return f"got {tuple(t.shape)} {t.dtype} on {t.device}"


def _check_reused(name: str, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """What `lightning_chunk_bwd` reuses must be what the forward of the same inputs returned."""
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
        raise ValueError(f"lightning_chunk_bwd: {name} must be the forward's, of shape {shape} {dtype} on {device} "
                         f"here, {_described(t)}")


def _plan_packed(T: int, cu_seqlens: Tensor, H: int, DC: int, segment_len: Optional[int],
                 tables: Optional[Tensor] = None) -> _Packed:
    """Build the chunk and range tables of N packed sequences (T tokens) on the device (`_packed_ranges`), or take
    them from `tables`: the buffer an earlier plan of the same inputs built (`_Packed.tables`; checked for its
    size, dtype and device)."""
    N = cu_seqlens.numel() - 1
    device = cu_seqlens.device
    max_chunks, ranges, range_chunks, seg_chunks = _packed_ranges(T, N, H, DC, device, segment_len)
    sizes = _packed_table_sizes(N, max_chunks, ranges)
    if tables is not None:
        _check_reused("packed_tables", tables, (sum(sizes),), torch.int32, device)
    ints = torch.empty(sum(sizes), dtype=torch.int32, device=device) if tables is None else tables
    chunk_table, chunk_offsets, seg_offsets, range_table, cut_seqs, cut_fwd, cut_rev, meta = torch.split(ints, sizes)
    chunk_table = chunk_table.view(max_chunks, 4)
    if tables is None:
        lightning_attn_packed_offsets_kernel[(1,)](
            cu_seqlens, chunk_offsets, seg_offsets, range_table, cut_seqs, cut_fwd, cut_rev, meta, N, ranges,
            range_chunks, SEG_CHUNKS=seg_chunks, BT=CHUNK, BLOCK=TABLE_BLOCK,
        )
        max_segments = max_chunks // seg_chunks + N
        lightning_attn_packed_tables_kernel[(triton.cdiv(max(max_chunks, max_segments), TABLE_BLOCK),)](
            cu_seqlens, chunk_offsets, seg_offsets, chunk_table, range_table, meta, N,
            SEG_CHUNKS=seg_chunks, BT=CHUNK, SEARCH_STEPS=max(1, N.bit_length()), BLOCK=TABLE_BLOCK,
        )
    return _Packed(N, T, seg_chunks * CHUNK, ranges, max_chunks, cu_seqlens, ints, chunk_table, chunk_offsets,
                   seg_offsets, range_table, cut_seqs, cut_fwd, cut_rev, meta)


def _block_v(DC: int) -> int:
    return min(BLOCK_V, DC)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs stay exact (no tf32 rounding); fp16 state products run in tf32 (fp16 precision, fp32 range).
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(t: Optional[Tensor]) -> tuple[int, int, int, int]:
    return t.stride() if t is not None else (0, 0, 0, 0)


def _start_slots(plan: _Segments | _Packed) -> int:
    return plan.ranges + 1 if isinstance(plan, _Packed) else plan.N * plan.num_segs


def _segment_start_states(b: Tensor, c: Tensor, log_decay: Tensor, state_in_scale: float,
                          initial: Optional[Tensor], plan: _Segments | _Packed, reverse: bool) -> Tensor:
    """The start states the output stage needs (b [B, T, H, DA], c [B, T, H, DC]): [_start_slots(plan), H, DA, DC]
    fp32, every segment's for an equal-length batch, every range's for a packed one (the entries of ranges that
    open a sequence are not read: zeros forwards, left unwritten backwards)."""
    H, DA, DC = b.shape[2], b.shape[3], c.shape[3]
    BV = _block_v(DC)
    BR = min(SCAN_ROWS, DA)
    tiles = H * (DC // BV)
    if isinstance(plan, _Packed):
        seg_chunks = plan.seg_len // CHUNK
        seg_states = torch.empty(plan.max_chunks // seg_chunks + 1, H, DA, DC, dtype=torch.float32, device=b.device)
        # Forwards start states are returned to the caller (`lightning_chunk_train_fwd`): the entries no range
        # reads are zeros there, not whatever the allocation held.
        new_starts = torch.empty if reverse else torch.zeros
        starts = new_starts(_start_slots(plan), H, DA, DC, dtype=torch.float32, device=b.device)
        # Work items: the needed segments (at most all whole ones, plus one per cut) x tiles, shared by the programs.
        states_grid = min((plan.max_chunks // seg_chunks + plan.ranges) * tiles, 2 * _resident_programs(b.device))
        scan_grid = max(1, plan.ranges - 1) * tiles * (DA // BR)
        tables = (plan.cu_seqlens, plan.seg_offsets, plan.chunk_offsets, plan.cut_seqs)
        cut_first, meta = (plan.cut_rev if reverse else plan.cut_fwd), plan.meta
        num_segs, cut_search_steps = 0, max(1, plan.ranges.bit_length())
    else:
        seg_states = starts = torch.empty(_start_slots(plan), H, DA, DC, dtype=torch.float32, device=b.device)
        states_grid, scan_grid = plan.N * plan.num_segs * tiles, plan.N * tiles * (DA // BR)
        tables, cut_first, meta = (None, None, None, None), None, None
        num_segs, cut_search_steps = plan.num_segs, 0
    lightning_attn_fwd_kernel_segment_states[(states_grid,)](
        b, c, log_decay, seg_states, *tables, cut_first, meta, plan.T, H, plan.seg_len, num_segs, state_in_scale,
        DA=DA, DC=DC, BT=CHUNK, BV=BV, REVERSE=reverse, IS_VARLEN=meta is not None,
        CUT_SEARCH_STEPS=cut_search_steps, DOT_PRECISION=_dot_precision(b.dtype), num_warps=STATES_WARPS,
        num_stages=STATES_STAGES,
    )
    lightning_attn_fwd_kernel_segment_scan[(scan_grid,)](
        log_decay, seg_states, starts, initial, *tables, meta, plan.T, H, plan.seg_len, num_segs,
        *_strides(initial), DA=DA, DC=DC, BT=CHUNK, BR=BR, BV=BV, REVERSE=reverse, IS_VARLEN=meta is not None,
        HAS_INITIAL=initial is not None, num_warps=4,
    )
    return starts


def _scan(a: Tensor, b: Tensor, c: Tensor, log_decay: Tensor, scale: float, state_in_scale: float,
          state_out_scale: float, starts: Optional[Tensor], initial: Optional[Tensor], plan: _Segments | _Packed,
          reverse: bool, final: Optional[Tensor], out_dtype: torch.dtype, cuda_output_stage: bool) -> Tensor:
    """Run the output stage. a, b [B, T, H, DA]; c [B, T, H, DC] -> out [B, T, H, DC] in out_dtype.

    starts: what `_segment_start_states` returned (None when plan.single); initial: [N, H, DA, DC] start of every
    sequence (any strides) or None (zeros); final: [N, H, DA, DC] (any strides) receives the end state, or None.
    cuda_output_stage: run the CUDA kernel `torch.ops.hypenet_cuda.lightning_chunk_scan` (packed batches:
    `lightning_chunk_scan_packed`, over the same tables) instead (bf16, DA == DC in (64, 128): `hypenet.ops.cuda_ext`
    says which inputs it takes)."""
    out = torch.empty(c.shape, dtype=out_dtype, device=c.device)
    if cuda_output_stage:
        # The kernel copies 16-byte vectors: a view that starts off that alignment is copied first.
        a, b, c = (t if t.data_ptr() % 16 == 0 else t.clone() for t in (a, b, c))
        if isinstance(plan, _Packed):
            torch.ops.hypenet_cuda.lightning_chunk_scan_packed(
                a, b, c, log_decay, starts, initial, final, out, plan.chunk_table, plan.range_table, scale,
                state_in_scale, state_out_scale, reverse)
        else:
            start = starts if not plan.single else initial
            torch.ops.hypenet_cuda.lightning_chunk_scan(a, b, c, log_decay, start, final, out, plan.seg_len,
                                                        plan.num_segs, scale, state_in_scale, state_out_scale,
                                                        reverse, not plan.single)
        return out
    H, DA, DC = a.shape[2], a.shape[3], c.shape[3]
    BV = _block_v(DC)
    common = dict(DA=DA, DC=DC, BT=CHUNK, BV=BV, REVERSE=reverse, STORE_FINAL=final is not None,
                  STATE_DOT_FP32=a.dtype != torch.bfloat16, DOT_PRECISION=_dot_precision(a.dtype),
                  num_warps=OUTPUT_WARPS, num_stages=OUTPUT_STAGES)
    if isinstance(plan, _Packed):
        lightning_attn_fwd_kernel_output_packed[(plan.ranges * H * (DC // BV),)](
            a, b, c, out, log_decay, starts, initial, final, plan.chunk_table, plan.range_table,
            H, scale, state_in_scale, state_out_scale, *_strides(starts), *_strides(initial), *_strides(final),
            HAS_RANGE_STATES=starts is not None, HAS_INITIAL=initial is not None, **common,
        )
    else:
        start = starts if not plan.single else initial
        lightning_attn_fwd_kernel_output[(plan.N * plan.num_segs * H * (DC // BV),)](
            a, b, c, out, log_decay, start, final, plan.T, H, plan.seg_len, plan.num_segs,
            scale, state_in_scale, state_out_scale, *_strides(start), *_strides(final),
            HAS_START=start is not None, START_PER_SEGMENT=not plan.single, **common,
        )
    return out


def _plan(q: Tensor, DC: int, cu_seqlens: Optional[Tensor], segment_len: Optional[int],
          packed_tables: Optional[Tensor] = None) -> _Segments | _Packed:
    B, T, H, _ = q.shape
    if cu_seqlens is not None:
        return _plan_packed(T, cu_seqlens, H, DC, segment_len, packed_tables)
    return _plan_segments(T, B, H, DC, q.device, segment_len)


def _prepare(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, cu_seqlens: Optional[Tensor],
             segment_len: Optional[int], packed_tables: Optional[Tensor] = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], _Segments | _Packed]:
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(f"lightning_chunk: {reason}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    log_decay = log_decay.to(torch.float32).contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    return q, k, v, log_decay, cu_seqlens, _plan(q, v.shape[-1], cu_seqlens, segment_len, packed_tables)


def start_states_shape(q: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], *,
                       segment_len: Optional[int] = None) -> tuple[int, ...]:
    """Shape of the start states `lightning_chunk_train_fwd` returns for these inputs, (0,) where it returns None.
    Host-side only (no kernel runs), so it also sizes fake tensors while tracing."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K != V:  # the dq scan then cuts the sequences for K columns, not V: nothing to reuse
        return (0,)
    if cu_seqlens is None:
        plan = _plan_segments(T, B, H, V, q.device, segment_len)
        slots = 0 if plan.single else _start_slots(plan)
    else:
        ranges = _packed_ranges(T, cu_seqlens.shape[0] - 1, H, V, q.device, segment_len)[1]
        slots = 0 if ranges == 1 else ranges + 1
    return (slots, H, K, V) if slots else (0,)


def packed_tables_shape(q: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], *,
                        segment_len: Optional[int] = None) -> tuple[int]:
    """Shape of the int32 packed-batch tables `lightning_chunk_train_fwd` returns, (0,) where it returns None
    (no cu_seqlens). Host-side only, like `start_states_shape`."""
    if cu_seqlens is None:
        return (0,)
    _, T, H, _ = q.shape
    N = cu_seqlens.shape[0] - 1
    max_chunks, ranges = _packed_ranges(T, N, H, v.shape[-1], q.device, segment_len)[:2]
    return (sum(_packed_table_sizes(N, max_chunks, ranges)),)


def lightning_chunk_fwd(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float,
                        initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], output_final_state: bool,
                        *, segment_len: Optional[int] = None, cuda_output_stage: bool = False
                        ) -> tuple[Tensor, Optional[Tensor]]:
    """Forward of Lightning Attention (`lightning_chunk_train_fwd` without what the backward reuses)."""
    o, final, _, _ = lightning_chunk_train_fwd(q, k, v, log_decay, scale, initial_state, cu_seqlens,
                                               output_final_state, segment_len=segment_len,
                                               cuda_output_stage=cuda_output_stage)
    return o, final


def lightning_chunk_train_fwd(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float,
                              initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor],
                              output_final_state: bool, *, segment_len: Optional[int] = None,
                              cuda_output_stage: bool = False
                              ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Forward of Lightning Attention that also returns what its backward can reuse: the states it started its
    segments (packed: ranges) from, and for packed batches the device tables that cut them into chunks and ranges.
    The backward's dq scan starts from the same states, transposed, and its scans walk the same chunks:
    `lightning_chunk_bwd(..., start_states=..., packed_tables=...)` reuses them instead of reading k and v once more
    for the segment stages and building the tables again.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (bf16, fp16 or fp32, one dtype).
        log_decay: [H] float32 <= 0.
        scale: output scale.
        initial_state: [N, H, K, V] float32 or None (zeros).
        cu_seqlens: [N + 1] int offsets of N sequences packed in row 0 (B == 1), or None (N = B).
        output_final_state: also return the state after each sequence's last token.
        segment_len: tokens per parallel segment (packed: per range of chunks), a multiple of 64; default chosen
            from the shapes and the device.
        cuda_output_stage: walk the segments with the CUDA kernel of hypenet._C (see `_scan`); the segment stages
            stay Triton kernels.
    Returns:
        o [B, T, H, V] in q.dtype; final_state [N, H, K, V] float32 or None; start states of shape
        `start_states_shape(q, v, cu_seqlens)` float32, or None when that is (0,); packed tables of shape
        `packed_tables_shape(q, v, cu_seqlens)` int32, or None without cu_seqlens.
    """
    q, k, v, log_decay, cu_seqlens, plan = _prepare(q, k, v, log_decay, cu_seqlens, segment_len)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    final = torch.empty(plan.N, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    starts = None if plan.single else _segment_start_states(k, v, log_decay, 1.0, initial_state, plan, False)
    o = _scan(q, k, v, log_decay, scale, 1.0, scale, starts, initial_state, plan, False, final, q.dtype,
              cuda_output_stage)
    return o, final, (starts if K == V else None), (plan.tables if isinstance(plan, _Packed) else None)


def lightning_chunk_bwd(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float,
                        initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], do: Tensor,
                        dfinal_state: Optional[Tensor], *, segment_len: Optional[int] = None,
                        start_states: Optional[Tensor] = None, packed_tables: Optional[Tensor] = None,
                        cuda_output_stage: bool = False) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Backward of Lightning Attention (inputs as in `lightning_chunk_fwd`).

    Args:
        do: [B, T, H, V] gradient of o.
        dfinal_state: [N, H, K, V] gradient of final_state, or None (zero).
        start_states, packed_tables: what `lightning_chunk_train_fwd` returned for the same inputs and segment_len,
            or None (recomputed).
        cuda_output_stage: the three scans walk their segments with the CUDA kernel (as in the forward).
    Returns:
        dq [B, T, H, K], dk [B, T, H, K], dv [B, T, H, V] in q.dtype; d initial_state [N, H, K, V] float32
        (None when initial_state is None).
    """
    if packed_tables is not None and cu_seqlens is None:
        raise ValueError(f"lightning_chunk_bwd: packed_tables must be None without cu_seqlens, "
                         f"{_described(packed_tables)}")
    q, k, v, log_decay, cu_seqlens, plan_v = _prepare(q, k, v, log_decay, cu_seqlens, segment_len, packed_tables)
    do = do.to(q.dtype).contiguous()
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    plan_k = plan_v if K == V else _plan(q, K, cu_seqlens, segment_len)

    # dq: forwards scan of (do, v, k) over the transposed forward state.
    initial_t = initial_state.transpose(-1, -2) if initial_state is not None else None
    if start_states is not None:
        if K != V or plan_k.single:
            raise ValueError(f"lightning_chunk_bwd: these shapes have no start states to reuse (K = {K}, V = {V}, "
                             f"one segment per sequence: {plan_k.single}); start_states must be None, "
                             f"{_described(start_states)}")
        _check_reused("start_states", start_states, (_start_slots(plan_k), H, K, V), torch.float32, q.device)
        starts_t = start_states.transpose(-1, -2)
    else:
        starts_t = None if plan_k.single else _segment_start_states(v, k, log_decay, 1.0, initial_t, plan_k, False)
    dq = _scan(do, v, k, log_decay, scale, 1.0, scale, starts_t, initial_t, plan_k, False, None, q.dtype,
               cuda_output_stage)

    # dv and dk: backwards scans over the adjoint state dS [K, V] and its transpose.
    adjoint_v = None if plan_v.single else _segment_start_states(q, do, log_decay, scale, dfinal_state, plan_v, True)
    dinitial = (torch.empty(plan_v.N, H, K, V, dtype=torch.float32, device=q.device)
                if initial_state is not None else None)
    dv = _scan(k, q, do, log_decay, scale, scale, 1.0, adjoint_v, dfinal_state, plan_v, True, dinitial, q.dtype,
               cuda_output_stage)

    dfinal_t = dfinal_state.transpose(-1, -2) if dfinal_state is not None else None
    if plan_k is plan_v:
        adjoint_k = adjoint_v.transpose(-1, -2) if adjoint_v is not None else None
    else:
        adjoint_k = None if plan_k.single else _segment_start_states(do, q, log_decay, scale, dfinal_t, plan_k, True)
    dk = _scan(v, do, q, log_decay, scale, scale, 1.0, adjoint_k, dfinal_t, plan_k, True, None, q.dtype,
               cuda_output_stage)
    return dq, dk, dv, dinitial
