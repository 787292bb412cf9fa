"""Lightning Attention decode step in Triton: advance fp32 states in place by a few tokens.

For each row b (state slot s = state_indices[b]), head h and new token t = 0..T-1:
    S = exp(log_decay[h]) * S + k_t^T v_t        S = state[s, h], [K, V] float32
    o_t = scale * q_t S
The op is memory bound (the state is read and written once, K * V * 8 bytes per row and head), so
each program owns a [K, BV] column slice of one state, keeps it in registers over the T tokens and
stores it once; B * H * cdiv(V, BV) programs fill the GPU even at small batch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_HEAD_DIM = 256  # the [K, BV] slice lives in registers; larger K would spill
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def lightning_attn_step_fwd_kernel_decode(
    q, k, v, log_decay, state, state_indices, o,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh,
    stride_sn, stride_sh, stride_sk, stride_sv,
    stride_idx,
    T, H, N, scale,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_INDICES: tl.constexpr,
):
    """Grid (cdiv(V, BV), B * H). Rows whose slot is outside [0, N) touch no state and get NaN outputs."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H

    if HAS_INDICES:
        slot = tl.load(state_indices + i_b * stride_idx).to(tl.int64)
    else:
        slot = i_b
    valid = (slot >= 0) & (slot < N)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    # A bad slot gets an empty row range, so it loads and stores no state (a bool scalar and-ed
    # with a tensor mask is mistyped by the Triton interpreter, hence no `mask_k & valid`).
    rows_in_state = o_k < tl.where(valid, K, 0)
    mask_s = rows_in_state[:, None] & mask_v[None, :]

    p_s = state + slot * stride_sn + i_h * stride_sh + o_k[:, None] * stride_sk + o_v[None, :] * stride_sv
    b_s = tl.load(p_s, mask=mask_s, other=0.0)  # (BK, BV) float32
    decay = tl.exp(tl.load(log_decay + i_h))

    p_q = q + i_b * stride_qb + i_h * stride_qh + o_k * stride_qd
    p_k = k + i_b * stride_kb + i_h * stride_kh + o_k * stride_kd
    p_v = v + i_b * stride_vb + i_h * stride_vh + o_v * stride_vd
    p_o = o + i_b * stride_ob + i_h * stride_oh + o_v
    for t in range(T - 1):
        b_s, b_q = _advance(b_s, decay, p_q + t * stride_qt, p_k + t * stride_kt, p_v + t * stride_vt, mask_k, mask_v)
        _store_output(b_s, b_q, scale, valid, p_o + t * stride_ot, mask_v)
    # The last token (T >= 1): the state is stored before the output's reduction over K, so its stores
    # leave while the reduction runs.
    t = T - 1
    b_s, b_q = _advance(b_s, decay, p_q + t * stride_qt, p_k + t * stride_kt, p_v + t * stride_vt, mask_k, mask_v)
    tl.store(p_s, b_s, mask=mask_s)
    _store_output(b_s, b_q, scale, valid, p_o + t * stride_ot, mask_v)


@triton.jit
def _advance(b_s, decay, p_q, p_k, p_v, mask_k, mask_v):
    """One token: S = decay * S + k^T v on the (BK, BV) tile; returns the new tile and q as float32."""
    b_q = tl.load(p_q, mask=mask_k, other=0.0).to(tl.float32)
    b_k = tl.load(p_k, mask=mask_k, other=0.0).to(tl.float32)
    b_v = tl.load(p_v, mask=mask_v, other=0.0).to(tl.float32)
    return b_s * decay + b_k[:, None] * b_v[None, :], b_q


@triton.jit
def _store_output(b_s, b_q, scale, valid, p_o, mask_v):
    """o = scale * q S over the tile's columns; NaN for a row whose slot is outside the pool."""
    b_o = tl.sum(b_s * b_q[:, None], axis=0) * scale  # (BV,)
    b_o = tl.where(valid, b_o, float("nan"))
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=mask_v)


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, state: Tensor) -> Optional[str]:
    """Why this kernel cannot run these (already validated) inputs, or None when it can."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the Triton step kernel takes q, k, v in {[str(d) for d in SUPPORTED_DTYPES]}, got {q.dtype}"
    if state.dtype != torch.float32:
        return f"the Triton step kernel keeps float32 states, got state dtype {state.dtype}"
    K, V = q.shape[-1], v.shape[-1]
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        return f"the Triton step kernel supports K, V <= {MAX_HEAD_DIM}, got K={K}, V={V}"
    return None


def lightning_attn_step(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor, scale: float,
                        state_indices: Optional[Tensor] = None) -> Tensor:
    """Advance `state` in place by the T tokens of each row and return the outputs.

    Args:
        q (Tensor): queries [B, T, H, K].
        k (Tensor): keys [B, T, H, K].
        v (Tensor): values [B, T, H, V].
        log_decay (Tensor): [H] float32.
        state (Tensor): [N, H, K, V] float32 pool, updated in place.
        scale (float): output scale.
        state_indices (Tensor): [B] int32/int64 distinct slots in [0, N); None means arange(B).
    Returns:
        o [B, T, H, V] in q.dtype.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    if o.numel() == 0:
        return o
    BK = triton.next_power_of_2(K)
    # 32 columns per program: B * H * V / 32 programs fill the GPU at decode batch sizes.
    BV = min(32, triton.next_power_of_2(V))
    has_indices = state_indices is not None
    grid = (triton.cdiv(V, BV), B * H)
    lightning_attn_step_fwd_kernel_decode[grid](
        q, k, v, log_decay, state, state_indices if has_indices else q, o,
        *q.stride(), *k.stride(), *v.stride(), *o.stride()[:3], *state.stride(),
        state_indices.stride(0) if has_indices else 0,
        T, H, state.shape[0], scale,
        K=K, V=V, BK=BK, BV=BV, HAS_INDICES=has_indices,
        num_warps=4 if BK * BV <= 4096 else 8,
    )
    return o
