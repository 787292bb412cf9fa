"""Naive Lightning Attention (constant-decay linear attention): the specification of `lightning_attn`.

Recurrence per head h with the per-step factor gamma_h = exp(log_decay[h]):
    S_t = gamma_h * S_{t-1} + k_t^T v_t        S_t is [K, V]
    o_t = scale * q_t S_t
which equals causal linear attention with the decay mask, o_t = scale * sum_{j<=t} gamma^(t-j) (q_t . k_j) v_j.
Everything is computed in float32 (float64 when the inputs are float64, for the test oracle).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

REFERENCE_CHUNK = 64


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64 (the oracle of the tests); everything else is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunked_one_sequence(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float, state: Tensor,
                          chunk: int) -> tuple[Tensor, Tensor]:
    """Exact chunked form for one sequence. q, k [T, H, K]; v [T, H, V]; state [H, K, V]. Returns o [T, H, V], state."""
    T, H, K = q.shape
    V = v.shape[-1]
    # At least one chunk: an empty sequence runs one chunk of padding, so that its empty output stays in the autograd
    # graph of the inputs (as the kernels' outputs do) and the state passes through unchanged.
    n_chunks = max(1, (T + chunk - 1) // chunk)
    pad = n_chunks * chunk - T
    # Zero keys and values at the tail padding add nothing to any state; the true chunk lengths below keep the
    # final state exact (no extra decay over padded steps).
    q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    q = q.view(n_chunks, chunk, H, K).transpose(1, 2)  # (NC, H, C, K)
    k = k.view(n_chunks, chunk, H, K).transpose(1, 2)  # (NC, H, C, K)
    v = v.view(n_chunks, chunk, H, V).transpose(1, 2)  # (NC, H, C, V)

    i = torch.arange(chunk, device=q.device, dtype=q.dtype)
    g = log_decay.to(q.dtype)[:, None]  # (H, 1)
    diff = i[:, None] - i[None, :]  # (C, C): i - j
    intra_decay = torch.where(diff >= 0, torch.exp(g[:, :, None] * diff.clamp(min=0)), torch.zeros((), dtype=q.dtype,
                                                                                                    device=q.device))
    query_decay = torch.exp(g * (i + 1))  # (H, C): gamma^(i+1), the state entering the chunk seen from row i

    outputs = []
    for c in range(n_chunks):
        length = min(chunk, T - c * chunk)
        qc, kc, vc = q[c], k[c], v[c]
        scores = (qc @ kc.transpose(-1, -2)) * intra_decay  # (H, C, C)
        o = scores @ vc + (qc * query_decay[:, :, None]) @ state  # (H, C, V)
        outputs.append(o)
        key_decay = torch.exp(g * (length - 1 - i).clamp(min=0)) * (i < length)  # (H, C): gamma^(L-1-j), real j
        state = torch.exp(g[:, :, None] * length) * state + (kc * key_decay[:, :, None]).transpose(-1, -2) @ vc
    o = torch.stack(outputs).transpose(1, 2).reshape(n_chunks * chunk, H, V)[:T]
    return o * scale, state


def _recurrent_one_sequence(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float,
                            state: Tensor) -> tuple[Tensor, Tensor]:
    """Step-by-step recurrence for one sequence. q, k [T, H, K]; v [T, H, V]; state [H, K, V]."""
    gamma = torch.exp(log_decay.to(q.dtype))[:, None, None]  # (H, 1, 1)
    outputs = []
    for t in range(q.shape[0]):
        state = gamma * state + k[t][:, :, None] * v[t][:, None, :]  # (H, K, V)
        outputs.append(torch.einsum("hk,hkv->hv", q[t], state) * scale)
    return torch.stack(outputs) if outputs else q.new_zeros(0, *v.shape[1:]), state


def _run(form, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype = compute_dtype(q)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    if cu_seqlens is None:
        # Rows of a batch are independent sequences of equal length: run them as B*H heads of one sequence.
        fold = lambda x: x.transpose(0, 1).reshape(T, B * H, x.shape[-1])  # noqa: E731 - (T, B*H, D)
        state = (initial_state.to(dtype).reshape(B * H, K, V) if initial_state is not None
                 else qf.new_zeros(B * H, K, V))
        o, state = form(fold(qf), fold(kf), fold(vf), log_decay.repeat(B), scale, state)
        final_state = state.view(B, H, K, V) if output_final_state else None
        return o.view(T, B, H, V).transpose(0, 1).to(q.dtype), final_state
    outputs, states = [], []
    for n, (start, end) in enumerate(zip(cu_seqlens.tolist(), cu_seqlens.tolist()[1:])):
        state = initial_state[n].to(dtype) if initial_state is not None else qf.new_zeros(H, K, V)
        o, state = form(qf[0, start:end], kf[0, start:end], vf[0, start:end], log_decay, scale, state)
        outputs.append(o)
        states.append(state)
    final_state = torch.stack(states) if output_final_state else None  # float32 (float64 for the oracle)
    return torch.cat(outputs).view(1, T, H, V).to(q.dtype), final_state


def lightning_attn_ref(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: Optional[float] = None,
                       initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                       cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Chunked exact Lightning Attention (fast enough for CPU tests at a few thousand tokens).

    Args:
        q (Tensor): queries [B, T, H, K].
        k (Tensor): keys [B, T, H, K].
        v (Tensor): values [B, T, H, V].
        log_decay (Tensor): per-head log decay [H], <= 0.
        scale (float): output scale, default K^-0.5.
        initial_state (Tensor): [N, H, K, V] float32 or None (zeros).
        output_final_state (bool): return the state after the last token.
        cu_seqlens (Tensor): [N + 1] offsets of N packed sequences in row 0 (B == 1), or None (N = B).
    Returns:
        o [B, T, H, V] in q.dtype, final_state [N, H, K, V] float32 (None unless asked).
    """
    form = lambda *a: _chunked_one_sequence(*a, chunk=REFERENCE_CHUNK)  # noqa: E731
    return _run(form, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def lightning_attn_recurrent_ref(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: Optional[float] = None,
                                 initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                                 cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """The same function as `lightning_attn_ref`, one token at a time (slow; checks the chunked form)."""
    return _run(_recurrent_one_sequence, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def lightning_attn_step_ref(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                            scale: Optional[float] = None, state_indices: Optional[Tensor] = None) -> Tensor:
    """Decode: advance the states of a pool by T tokens in place and return the outputs.

    Args:
        q, k (Tensor): [B, T, H, K]; v (Tensor): [B, T, H, V] (T small, 1 for plain decode).
        log_decay (Tensor): [H].
        state (Tensor): [N, H, K, V] float32 pool, updated in place.
        state_indices (Tensor): [B] integer slot of each row in the pool; default arange(B).
    Returns:
        o [B, T, H, V] in q.dtype.
    """
    B = q.shape[0]
    rows = torch.arange(B, device=q.device) if state_indices is None else state_indices.long()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = compute_dtype(state)
    outputs = []
    for b in range(B):
        slot = int(rows[b])
        o, new_state = _recurrent_one_sequence(q[b].to(dtype), k[b].to(dtype), v[b].to(dtype), log_decay, scale,
                                               state[slot].to(dtype))
        state[slot] = new_state.to(state.dtype)
        outputs.append(o)
    return torch.stack(outputs).to(q.dtype) if outputs else q.new_zeros(*q.shape[:-1], v.shape[-1])
