"""Public Lightning Attention ops: `lightning_attn` (training / prefill) and `lightning_attn_step` (decode)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import (INDEX_DTYPES, check_cu_seqlens, check_index_range, check_rank4_group, check_scale,
                     check_shape, check_tensor, check_values_once)
from .dispatch import cuda_kernel_reason, kernel_op, load_kernel_module, select_backend, triton_kernel_reason
from .reference.lightning import lightning_attn_ref, lightning_attn_step_ref

CHUNK_MODULE = "triton_ops.lightning.chunk"
STEP_MODULE = "triton_ops.lightning.step"


def chunk_scan_op(packed: bool) -> str:
    """The hypenet._C op that runs lightning_attn's scan: one for equal-length batches, one for packed (cu_seqlens)."""
    return "lightning_chunk_scan_packed" if packed else "lightning_chunk_scan"


def _check_log_decay(log_decay: object, H: int, device: torch.device) -> None:
    check_tensor("log_decay", log_decay, ndim=1, dtypes=(torch.float32,), device=device)
    check_shape("log_decay", log_decay, (H,), "[H]")

    def check(t: Tensor) -> None:
        if not bool(torch.isfinite(t).all()) or bool((t > 0).any()):
            raise ValueError(f"log_decay must be finite and <= 0 (per-step factor exp(log_decay) <= 1), "
                             f"got {t.tolist()}")

    check_values_once(log_decay, "log_decay", check)


def _check_qkv(q: object, k: object, v: object) -> tuple[int, int, int, int, int]:
    check_rank4_group(("q", "k", "v"), (q, k, v))
    B, T, H, K = q.shape
    check_shape("k", k, (B, T, H, K), "[B, T, H, K] like q")
    check_shape("v", v, (B, T, H, None), "[B, T, H, V]")
    return B, T, H, K, v.shape[-1]


def lightning_attn(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, *, scale: Optional[float] = None,
                   initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                   cu_seqlens: Optional[Tensor] = None,
                   backend: Optional[str] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Constant-decay linear attention: S_t = exp(log_decay[h]) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.

    Args:
        q (Tensor): queries [B, T, H, K] (bf16, fp16 or fp32; fp64 on the reference backend).
        k (Tensor): keys [B, T, H, K].
        v (Tensor): values [B, T, H, V].
        log_decay (Tensor): [H] float32, <= 0, the same at every step.
        scale (float): output scale, default K^-0.5.
        initial_state (Tensor): [N, H, K, V] float32, the state before the first token of each sequence.
        output_final_state (bool): also return the state after the last token of each sequence.
        cu_seqlens (Tensor): [N + 1] int offsets of N sequences packed in one row (then B == 1); none leaks
            its state into the next.
        backend (str): "cuda" | "triton" | "reference" | None (auto; $HYPENET_BACKEND overrides).
    Returns:
        o [B, T, H, V] in q.dtype; final_state [N, H, K, V] float32, or None unless asked.
    Differentiable in q, k, v and initial_state. Under autograd the Triton backend also keeps the fp32 states at
    which its parallel segments start (when a sequence is cut into segments: [segments, H, K, V], 8 MB at B1 T65536
    H16 K=V=128) and, with cu_seqlens, its int32 chunk tables, so that the backward does not recompute them.
    """
    B, T, H, K, V = _check_qkv(q, k, v)
    device = q.device
    _check_log_decay(log_decay, H, device)
    check_scale(scale)
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences into one row: q must have B == 1, got B = {B}")
        N = check_cu_seqlens("cu_seqlens", cu_seqlens, T, device)
    else:
        N = B
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, dtypes=(torch.float32, torch.float64), device=device)
        check_shape("initial_state", initial_state, (N, H, K, V), "[N, H, K, V]")
    scale = K ** -0.5 if scale is None else float(scale)

    triton_reason = triton_kernel_reason(CHUNK_MODULE, device, q, k, v)
    reasons = {
        "reference": None,
        "triton": triton_reason,
        # The CUDA backend runs the output stage (the scan itself) in hypenet._C and the segment stages in Triton.
        "cuda": cuda_kernel_reason(chunk_scan_op(cu_seqlens is not None), device, q, k, v, initial_state) or (
            f"its segment stages are Triton kernels: {triton_reason}" if triton_reason else None),
    }
    chosen = select_backend("lightning_attn", backend, device, reasons)
    if chosen == "reference":
        return lightning_attn_ref(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    o, final_state, _, _ = _lightning_attn_fwd_op(q, k, v, log_decay, scale, initial_state, output_final_state,
                                                  cu_seqlens, chosen)
    return o, (final_state if output_final_state else None)


def _lightning_attn_fwd(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float,
                        initial_state: Optional[Tensor], output_final_state: bool, cu_seqlens: Optional[Tensor],
                        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """o, final_state, and what the backward reuses: the forward's segment start states and its packed-batch tables
    (custom ops return tensors only: an empty tensor stands for "not asked" or "none")."""
    kernels = load_kernel_module(CHUNK_MODULE)
    o, final_state, start_states, packed_tables = kernels.lightning_chunk_train_fwd(
        q, k, v, log_decay, scale, initial_state, cu_seqlens, output_final_state, cuda_output_stage=backend == "cuda")
    return o, _or_empty(final_state, q), _or_empty(start_states, q), _or_empty(packed_tables, q, torch.int32)


def _or_empty(t: Optional[Tensor], like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return t if t is not None else like.new_empty(0, dtype=dtype)


def _or_none(t: Tensor) -> Optional[Tensor]:
    return t if t.numel() else None


def _lightning_attn_fwd_fake(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, backend):
    B, T, H, _ = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    state_shape = (N, H, q.shape[-1], v.shape[-1]) if output_final_state else (0,)
    kernels = load_kernel_module(CHUNK_MODULE)
    return (v.new_empty(B, T, H, v.shape[-1], dtype=q.dtype), q.new_empty(state_shape, dtype=torch.float32),
            q.new_empty(kernels.start_states_shape(q, v, cu_seqlens), dtype=torch.float32),
            q.new_empty(kernels.packed_tables_shape(q, v, cu_seqlens), dtype=torch.int32))


def _lightning_attn_bwd(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float,
                        initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], do: Tensor,
                        dfinal_state: Optional[Tensor], start_states: Optional[Tensor],
                        packed_tables: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kernels = load_kernel_module(CHUNK_MODULE)
    dq, dk, dv, dinitial = kernels.lightning_chunk_bwd(q, k, v, log_decay, scale, initial_state, cu_seqlens, do,
                                                       dfinal_state, start_states=start_states,
                                                       packed_tables=packed_tables,
                                                       cuda_output_stage=backend == "cuda")
    return dq, dk, dv, _or_empty(dinitial, q)


def _lightning_attn_bwd_fake(q, k, v, log_decay, scale, initial_state, cu_seqlens, do, dfinal_state, start_states,
                             packed_tables, backend):
    dinitial = (torch.empty_like(initial_state, dtype=torch.float32) if initial_state is not None
                else q.new_empty(0, dtype=torch.float32))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dinitial


_lightning_attn_bwd_op = kernel_op("hypenet::lightning_attn_bwd", _lightning_attn_bwd, _lightning_attn_bwd_fake)


def _lightning_setup(ctx, inputs, output):
    q, k, v, log_decay, scale, initial_state, _, cu_seqlens, backend = inputs
    start_states, packed_tables = output[2], output[3]
    ctx.mark_non_differentiable(start_states, packed_tables)
    ctx.save_for_backward(q, k, v, log_decay, initial_state, cu_seqlens, start_states, packed_tables)
    ctx.scale, ctx.backend = scale, backend


def _lightning_backward(ctx, do, dfinal_state, _start_states, _packed_tables):
    q, k, v, log_decay, initial_state, cu_seqlens, start_states, packed_tables = ctx.saved_tensors
    if dfinal_state is not None and dfinal_state.numel() == 0:
        dfinal_state = None
    dq, dk, dv, dinitial = _lightning_attn_bwd_op(q, k, v, log_decay, ctx.scale, initial_state, cu_seqlens,
                                                  do.contiguous(), dfinal_state, _or_none(start_states),
                                                  _or_none(packed_tables), ctx.backend)
    return dq, dk, dv, None, None, (dinitial if initial_state is not None else None), None, None, None


_lightning_attn_fwd_op = kernel_op("hypenet::lightning_attn_fwd", _lightning_attn_fwd, _lightning_attn_fwd_fake,
                                   setup_context=_lightning_setup, backward=_lightning_backward)


def lightning_attn_step(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor, *,
                        scale: Optional[float] = None, state_indices: Optional[Tensor] = None,
                        backend: Optional[str] = None) -> Tensor:
    """Decode a few tokens: advance fp32 states in place and return the outputs (no autograd).

    Args:
        q, k (Tensor): [B, T, H, K]; v (Tensor): [B, T, H, V]; T small (1 for plain decode).
        log_decay (Tensor): [H] float32 <= 0.
        state (Tensor): [N, H, K, V] float32 contiguous pool of states, updated in place.
        scale (float): output scale, default K^-0.5.
        state_indices (Tensor): [B] distinct int slots in [0, N) of each row's state; default arange(B)
            (then N >= B).
        backend (str): "cuda" | "triton" | "reference" | None (auto).
    Returns:
        o [B, T, H, V] in q.dtype; equal to `lightning_attn` over the same tokens from the same state.
    """
    B, T, H, K, V = _check_qkv(q, k, v)
    device = q.device
    _check_log_decay(log_decay, H, device)
    check_scale(scale)
    check_tensor("state", state, ndim=4, dtypes=(torch.float32,), device=device, contiguous=True)
    check_shape("state", state, (None, H, K, V), "[N, H, K, V]")
    N = state.shape[0]
    if state_indices is None:
        if N < B:
            raise ValueError(f"state holds N = {N} slots but the batch has B = {B} rows; pass state_indices")
    else:
        check_tensor("state_indices", state_indices, ndim=1, dtypes=INDEX_DTYPES, device=device)
        check_shape("state_indices", state_indices, (B,), "[B]")
        check_index_range("state_indices", state_indices, N, "slots of state")

        def check_distinct(t: Tensor) -> None:
            if t.unique().numel() != t.numel():
                raise ValueError(f"state_indices must be distinct (two rows cannot advance one state), got "
                                 f"{t.tolist()}")

        check_values_once(state_indices, "distinct", check_distinct)
    if state.requires_grad:
        raise ValueError("state is updated in place and must not require grad")
    scale = K ** -0.5 if scale is None else float(scale)

    reasons = {
        "reference": None,
        "triton": triton_kernel_reason(STEP_MODULE, device, q, k, v, state),
        "cuda": cuda_kernel_reason("lightning_attn_step", device, q, k, v, state),
    }
    chosen = select_backend("lightning_attn_step", backend, device, reasons)
    if chosen == "reference":
        with torch.no_grad():
            return lightning_attn_step_ref(q, k, v, log_decay, state, scale, state_indices)
    return _lightning_attn_step_op(q, k, v, log_decay, state, state_indices, scale, chosen)


def _lightning_attn_step(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                         state_indices: Optional[Tensor], scale: float, backend: str) -> Tensor:
    if state_indices is None:
        state_indices = torch.arange(q.shape[0], device=q.device, dtype=torch.int32)
    if backend == "cuda":
        return torch.ops.hypenet_cuda.lightning_attn_step(q, k, v, log_decay, state, state_indices, scale)
    return load_kernel_module(STEP_MODULE).lightning_attn_step(q, k, v, log_decay, state, scale, state_indices)


def _lightning_attn_step_fake(q, k, v, log_decay, state, state_indices, scale, backend):
    return torch.empty_like(v, dtype=q.dtype)


_lightning_attn_step_op = kernel_op("hypenet::lightning_attn_step", _lightning_attn_step, _lightning_attn_step_fake,
                                    mutates_args=("state",))
