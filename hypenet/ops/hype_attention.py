"""Public HyPE attention ops: `hype_attn` (training / prefill) and `hype_attn_decode` (against a KV cache)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .checks import (INDEX_DTYPES, check_cu_seqlens, check_index_range, check_rank4_group, check_scale,
                     check_shape, check_tensor, check_values_once)
from .dispatch import cuda_kernel_reason, kernel_op, load_kernel_module, select_backend, triton_kernel_reason
from .reference.hype_attention import hype_attn_decode_ref, hype_attn_ref

FWD_MODULE = "triton_ops.hype_attention.fwd"
BWD_MODULE = "triton_ops.hype_attention.bwd"
DECODE_MODULE = "triton_ops.hype_attention.decode"


def check_alpha(alpha: Optional[float]) -> None:
    if alpha is None:
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (1 < alpha < math.inf):
        raise ValueError(f"alpha must be a finite number > 1 (s_t = ln(t + alpha) / ln(alpha)) or None, got {alpha!r}")


def _check_heads(q: Tensor, k: Tensor, v: Tensor, k_name: str, v_name: str) -> tuple[int, int, int]:
    Hq, D = q.shape[2], q.shape[3]
    Hkv = k.shape[2]
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"q, {k_name} and {v_name} must share the head dim D, got {D}, {k.shape[3]}, {v.shape[3]}")
    if v.shape[2] != Hkv:
        raise ValueError(f"{k_name} and {v_name} must have the same number of heads, got {Hkv} and {v.shape[2]}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the query heads Hq = {Hq} must be a multiple of the key/value heads Hkv = {Hkv}")
    return Hq, Hkv, D


def hype_attn(q: Tensor, k: Tensor, v: Tensor, *, alpha: Optional[float] = None, scale: Optional[float] = None,
              causal: bool = True, cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
              backend: Optional[str] = None) -> Tensor:
    """NoPE softmax attention with the HyPE logit scale s_t = ln(t + alpha) / ln(alpha) (fp32, in the kernel).

    Args:
        q (Tensor): queries [B, T, Hq, D] (bf16, fp16 or fp32; fp64 on the reference backend).
        k, v (Tensor): keys and values [B, S, Hkv, D], Hq % Hkv == 0, T <= S.
        alpha (float): HyPE constant > 1, or None (s_t = 1, as in training).
        scale (float): logit scale, default D^-0.5.
        causal (bool): mask keys after the query's position.
        cu_seqlens_q, cu_seqlens_k (Tensor): [N + 1] int offsets of N sequences packed into one row (B == 1);
            each sequence has its own positions and at least as many keys as queries.
        backend (str): "cuda" | "triton" | "reference" | None (auto; $HYPENET_BACKEND overrides).
    Query row i of a sequence with S keys and T queries sits at position t = S - T + i; the logit of key j is
    scale * s_t * (q_t . k_j), masked when causal and j > t.
    Returns:
        o [B, T, Hq, D] in q.dtype. Differentiable in q, k, v.
    """
    device = check_rank4_group(("q", "k", "v"), (q, k, v))
    B, T, Hq, D = q.shape
    S = k.shape[1]
    check_shape("k", k, (B, None, None, None), "[B, S, Hkv, D] with q's B")
    check_shape("v", v, (B, S, None, None), "[B, S, Hkv, D] like k")
    _check_heads(q, k, v, "k", "v")
    check_alpha(alpha)
    check_scale(scale)
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (packed queries need packed keys)")
    if cu_seqlens_q is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens_q/k pack sequences into one row: q must have B == 1, got B = {B}")
        n_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, T, device)
        n_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, S, device)
        if n_q != n_k:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                             f"got {n_q} and {n_k}")

        def check_lengths(t: Tensor) -> None:
            q_lens, k_lens = torch.diff(cu_seqlens_q).tolist(), torch.diff(t).tolist()
            if any(lq > lk for lq, lk in zip(q_lens, k_lens)):
                raise ValueError(f"every packed sequence needs at least as many keys as queries (queries are the "
                                 f"last positions), got query lengths {q_lens} and key lengths {k_lens}")

        check_values_once(cu_seqlens_k, f"q-lengths:{id(cu_seqlens_q)}:{cu_seqlens_q._version}", check_lengths)
    elif T > S:
        raise ValueError(f"queries are the last T of the S key positions: need T <= S, got T = {T}, S = {S}")
    scale = D ** -0.5 if scale is None else float(scale)
    alpha = None if alpha is None else float(alpha)

    reasons = {
        "reference": None,
        "triton": triton_kernel_reason(FWD_MODULE, device, q, k, v, causal),
        "cuda": cuda_kernel_reason("hype_attn", device, q, k, v),
    }
    chosen = select_backend("hype_attn", backend, device, reasons)
    if chosen == "reference":
        return hype_attn_ref(q, k, v, alpha, scale, causal, cu_seqlens_q, cu_seqlens_k)
    o, _ = _hype_attn_fwd_op(q, k, v, alpha, scale, causal, cu_seqlens_q, cu_seqlens_k, chosen)
    return o


def _hype_attn_fwd(q: Tensor, k: Tensor, v: Tensor, alpha: Optional[float], scale: float, causal: bool,
                   cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                   backend: str) -> tuple[Tensor, Tensor]:
    o, lse = load_kernel_module(FWD_MODULE).hype_attn_fwd(q, k, v, alpha, scale, causal, cu_seqlens_q,
                                                          cu_seqlens_k)
    return o, lse


def _hype_attn_fwd_fake(q, k, v, alpha, scale, causal, cu_seqlens_q, cu_seqlens_k, backend):
    B, T, Hq, _ = q.shape
    return torch.empty_like(q), q.new_empty(B, Hq, T, dtype=torch.float32)


def _hype_attn_bwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, alpha: Optional[float],
                   scale: float, causal: bool, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return load_kernel_module(BWD_MODULE).hype_attn_bwd(q, k, v, o, lse, do, alpha, scale, causal, cu_seqlens_q,
                                                        cu_seqlens_k)


def _hype_attn_bwd_fake(q, k, v, o, lse, do, alpha, scale, causal, cu_seqlens_q, cu_seqlens_k, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_hype_attn_bwd_op = kernel_op("hypenet::hype_attn_bwd", _hype_attn_bwd, _hype_attn_bwd_fake)


def _hype_setup(ctx, inputs, output):
    q, k, v, alpha, scale, causal, cu_seqlens_q, cu_seqlens_k, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.alpha, ctx.scale, ctx.causal, ctx.backend = alpha, scale, causal, backend


def _hype_backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = _hype_attn_bwd_op(q, k, v, o, lse, do.contiguous(), ctx.alpha, ctx.scale, ctx.causal, cu_seqlens_q,
                                   cu_seqlens_k, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


_hype_attn_fwd_op = kernel_op("hypenet::hype_attn_fwd", _hype_attn_fwd, _hype_attn_fwd_fake,
                              setup_context=_hype_setup, backward=_hype_backward)


def hype_attn_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                     alpha: Optional[float] = None, scale: Optional[float] = None,
                     block_table: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """HyPE attention of the newest Tq tokens of each row against its KV cache (no autograd).

    Args:
        q (Tensor): [B, Tq, Hq, D], Tq small; the new tokens' keys and values are already in the cache.
        k_cache, v_cache (Tensor): [B, S_max, Hkv, D], or paged [num_blocks, block_size, Hkv, D].
        cache_seqlens (Tensor): [B] int, valid tokens of each row including the new ones (>= Tq).
        alpha (float): HyPE constant > 1 or None; scale (float): default D^-0.5.
        block_table (Tensor): [B, max_blocks] int32 block indices of each row (paged caches).
        backend (str): "cuda" | "triton" | "reference" | None (auto).
    Query i of row b sits at position cache_seqlens[b] - Tq + i and sees keys 0..that position.
    Returns:
        o [B, Tq, Hq, D] in q.dtype.
    """
    device = check_rank4_group(("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
    B, Tq, Hq, D = q.shape
    check_shape("v_cache", v_cache, tuple(k_cache.shape), "the shape of k_cache")
    _check_heads(q, k_cache, v_cache, "k_cache", "v_cache")
    check_alpha(alpha)
    check_scale(scale)
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_shape("cache_seqlens", cache_seqlens, (B,), "[B]")
    if block_table is None:
        check_shape("k_cache", k_cache, (B, None, None, None), "[B, S_max, Hkv, D] with q's B (contiguous cache)")
        capacity = k_cache.shape[1]
    else:
        check_tensor("block_table", block_table, ndim=2, dtypes=INDEX_DTYPES, device=device)
        check_shape("block_table", block_table, (B, None), "[B, max_blocks]")
        capacity = block_table.shape[1] * k_cache.shape[1]
        check_index_range("block_table", block_table, k_cache.shape[0], "blocks of the paged cache")

    def check_lengths(t: Tensor) -> None:
        if t.numel() and (int(t.min()) < Tq or int(t.max()) > capacity):
            raise ValueError(f"cache_seqlens must lie in [Tq, capacity] = [{Tq}, {capacity}] (they count the new "
                             f"tokens, which must fit in the cache), got min {int(t.min())}, max {int(t.max())}")

    check_values_once(cache_seqlens, f"lengths:{Tq}:{capacity}", check_lengths)
    scale = D ** -0.5 if scale is None else float(scale)
    alpha = None if alpha is None else float(alpha)

    reasons = {
        "reference": None,
        "triton": triton_kernel_reason(DECODE_MODULE, device, q, k_cache, v_cache, block_table),
        "cuda": cuda_kernel_reason("hype_attn_decode", device, q, k_cache, v_cache),
    }
    chosen = select_backend("hype_attn_decode", backend, device, reasons)
    if chosen == "reference":
        with torch.no_grad():
            return hype_attn_decode_ref(q, k_cache, v_cache, cache_seqlens, alpha, scale, block_table)
    return _hype_attn_decode_op(q, k_cache, v_cache, cache_seqlens, alpha, scale, block_table, chosen)


def _hype_attn_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, alpha: Optional[float],
                      scale: float, block_table: Optional[Tensor], backend: str) -> Tensor:
    return load_kernel_module(DECODE_MODULE).hype_attn_decode(q, k_cache, v_cache, cache_seqlens, alpha, scale,
                                                              block_table)


def _hype_attn_decode_fake(q, k_cache, v_cache, cache_seqlens, alpha, scale, block_table, backend):
    return torch.empty_like(q)


_hype_attn_decode_op = kernel_op("hypenet::hype_attn_decode", _hype_attn_decode, _hype_attn_decode_fake)
