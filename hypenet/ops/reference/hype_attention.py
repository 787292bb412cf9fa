"""Naive HyPE attention: the specification of `hype_attn` and `hype_attn_decode`.

NoPE causal softmax attention whose logits are multiplied, per query at absolute position t, by
s_t = ln(t + alpha) / ln(alpha) (s_0 = 1), computed in float32. Queries are the last T of the S key positions:
query row i sits at t = S - T + i (per sequence when packed).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .lightning import compute_dtype


def hype_logit_scale(positions: Tensor, alpha: Optional[float], dtype: torch.dtype = torch.float32) -> Tensor:
    """s_t = ln(t + alpha) / ln(alpha) for absolute positions t (any shape); ones when alpha is None."""
    positions = positions.to(dtype)
    if alpha is None:
        return torch.ones_like(positions)
    return torch.log(positions + alpha) / math.log(alpha)


def _logits(q: Tensor, k: Tensor, alpha: Optional[float], scale: float, causal: bool) -> Tensor:
    """One sequence. q [T, Hq, D]; k [S, Hkv, D] -> the scaled, masked logits [Hq, T, S] in q's dtype."""
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    k = k.repeat_interleave(Hq // Hkv, dim=1)  # (S, Hq, D): query head h reads kv head h // (Hq / Hkv)
    t = torch.arange(S - T, S, device=q.device)  # absolute position of every query row
    s_t = hype_logit_scale(t, alpha, q.dtype)  # (T,)
    logits = torch.einsum("thd,shd->hts", q, k) * (scale * s_t)[None, :, None]
    if causal:
        j = torch.arange(S, device=q.device)
        logits = logits.masked_fill(j[None, None, :] > t[None, :, None], float("-inf"))
    return logits


def _attend(q: Tensor, k: Tensor, v: Tensor, alpha: Optional[float], scale: float, causal: bool) -> Tensor:
    """One sequence. q [T, Hq, D]; k, v [S, Hkv, D] -> o [T, Hq, D], in q's (compute) dtype."""
    v = v.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.einsum("hts,shd->thd", torch.softmax(_logits(q, k, alpha, scale, causal), dim=-1), v)


def _row_lse(q: Tensor, k: Tensor, alpha: Optional[float], scale: float, causal: bool) -> Tensor:
    """One sequence -> the log-sum-exp of every query row's logits, [Hq, T]."""
    return torch.logsumexp(_logits(q, k, alpha, scale, causal), dim=-1)


def _per_sequence(fn, q: Tensor, k: Tensor, alpha: Optional[float], scale: Optional[float], causal: bool,
                  cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], *extra: Tensor,
                  time_dim: int) -> Tensor:
    """fn(q, k, *extra, alpha, scale, causal) over every sequence of a dense or packed batch, in the compute dtype;
    the pieces are stacked over the batch or, packed, joined along time_dim."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = compute_dtype(q)
    qf, kf = q.to(dtype), k.to(dtype)
    extra = [t.to(dtype) for t in extra]
    if cu_seqlens_q is None:
        B = q.shape[0]
        if B == 0:
            # An empty batch runs one all-zero row, dropped below, so that its empty result stays in the autograd
            # graph of the inputs (as the kernels' results do).
            qf, kf, *extra = (torch.cat([t, t.new_zeros(1, *t.shape[1:])]) for t in (qf, kf, *extra))
        pieces = [fn(qf[b], kf[b], *[t[b] for t in extra], alpha, scale, causal) for b in range(max(B, 1))]
        return torch.stack(pieces)[:B]
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    pieces = [fn(qf[0, bq[n]:bq[n + 1]], kf[0, bk[n]:bk[n + 1]], *[t[0, bk[n]:bk[n + 1]] for t in extra], alpha,
                 scale, causal) for n in range(len(bq) - 1)]
    return torch.cat(pieces, dim=time_dim)[None]


def hype_attn_ref(q: Tensor, k: Tensor, v: Tensor, alpha: Optional[float] = None, scale: Optional[float] = None,
                  causal: bool = True, cu_seqlens_q: Optional[Tensor] = None,
                  cu_seqlens_k: Optional[Tensor] = None) -> Tensor:
    """HyPE attention, computed in float32 (float64 for float64 inputs).

    Args:
        q (Tensor): queries [B, T, Hq, D].
        k, v (Tensor): keys and values [B, S, Hkv, D], Hq % Hkv == 0.
        alpha (float): HyPE constant a > 1, or None for no position scaling.
        scale (float): logit scale, default D^-0.5.
        causal (bool): mask keys j > t.
        cu_seqlens_q, cu_seqlens_k (Tensor): [N + 1] offsets of N packed sequences in row 0 (B == 1), or None.
    Returns:
        o [B, T, Hq, D] in q.dtype.
    """
    return _per_sequence(_attend, q, k, alpha, scale, causal, cu_seqlens_q, cu_seqlens_k, v, time_dim=0).to(q.dtype)


def hype_attn_lse_ref(q: Tensor, k: Tensor, alpha: Optional[float] = None, scale: Optional[float] = None,
                      causal: bool = True, cu_seqlens_q: Optional[Tensor] = None,
                      cu_seqlens_k: Optional[Tensor] = None) -> Tensor:
    """The natural-log log-sum-exp of every query row's logits (arguments as in `hype_attn_ref`): [B, Hq, T] in
    float32 (float64 for float64 inputs), what the forward kernels save for their backward."""
    return _per_sequence(_row_lse, q, k, alpha, scale, causal, cu_seqlens_q, cu_seqlens_k, time_dim=1)


def gather_cache_rows(cache: Tensor, length: int, row: int, block_table: Optional[Tensor]) -> Tensor:
    """The first `length` cached tokens of batch row `row` -> [length, Hkv, D], from a contiguous
    [B, S_max, Hkv, D] cache or a paged [num_blocks, block_size, Hkv, D] cache with its block table."""
    if block_table is None:
        return cache[row, :length]
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[row, :n_blocks].long()]  # (n_blocks, block_size, Hkv, D)
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def hype_attn_decode_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                         alpha: Optional[float] = None, scale: Optional[float] = None,
                         block_table: Optional[Tensor] = None) -> Tensor:
    """HyPE attention of a few new queries against a KV cache.

    Args:
        q (Tensor): [B, Tq, Hq, D], the newest Tq tokens of each row (already written to the cache).
        k_cache, v_cache (Tensor): [B, S_max, Hkv, D], or paged [num_blocks, block_size, Hkv, D].
        cache_seqlens (Tensor): [B] valid tokens per row, new ones included; query i of row b sits at
            position cache_seqlens[b] - Tq + i.
        block_table (Tensor): [B, max_blocks] block indices of each row (paged caches only).
    Returns:
        o [B, Tq, Hq, D] in q.dtype.
    """
    outputs = []
    for b, length in enumerate(cache_seqlens.tolist()):
        k = gather_cache_rows(k_cache, length, b, block_table)
        v = gather_cache_rows(v_cache, length, b, block_table)
        outputs.append(hype_attn_ref(q[b:b + 1], k[None], v[None], alpha=alpha, scale=scale, causal=True))
    return torch.cat(outputs) if outputs else q.new_zeros(q.shape)
