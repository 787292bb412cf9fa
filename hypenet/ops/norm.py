"""Public fused helpers of the HypeNet layers: `rmsnorm_gate` and `qk_norm_rope`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import check_same_dtype, check_shape, check_tensor
from .dispatch import kernel_op, load_kernel_module, select_backend, triton_kernel_reason
from .reference.norm import qk_norm_rope_ref, rmsnorm_gate_ref

NORM_MODULE = "triton_ops.norm"


def _check_eps(eps: float) -> None:
    if not isinstance(eps, (int, float)) or not (0 <= eps < 1):
        raise ValueError(f"eps must be a float in [0, 1), got {eps!r}")


def rmsnorm_gate(x: Tensor, z: Tensor, weight: Tensor, *, eps: float = 1e-6, backend: Optional[str] = None) -> Tensor:
    """RMSNorm(x) * weight * sigmoid(z) over the last dim, in float32, cast once to x.dtype.

    Args:
        x, z (Tensor): [..., C], same shape and dtype.
        weight (Tensor): [C].
    Returns:
        y [..., C] in x.dtype. Differentiable in x, z and weight.
    """
    check_tensor("x", x)
    device = x.device
    check_tensor("z", z, device=device)
    check_tensor("weight", weight, ndim=1, device=device)
    check_same_dtype(("x", "z"), (x, z))
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (the normalised channels)")
    check_shape("z", z, tuple(x.shape), "the shape of x")
    check_shape("weight", weight, (x.shape[-1],), "[C] with C = x.shape[-1]")
    _check_eps(eps)
    reasons = {"reference": None, "triton": triton_kernel_reason(NORM_MODULE, device, x, z, weight)}
    chosen = select_backend("rmsnorm_gate", backend, device, reasons)
    if chosen == "reference":
        return rmsnorm_gate_ref(x, z, weight, eps)
    y, _ = _rmsnorm_gate_fwd_op(x, z, weight, float(eps))
    return y


def _rmsnorm_gate_fwd(x: Tensor, z: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return load_kernel_module(NORM_MODULE).rmsnorm_gate_fwd(x, z, weight, eps)


def _rmsnorm_gate_fwd_fake(x, z, weight, eps):
    # the kernel writes contiguous outputs whatever the input strides
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _rmsnorm_gate_bwd(x: Tensor, z: Tensor, weight: Tensor, rstd: Tensor,
                      dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return load_kernel_module(NORM_MODULE).rmsnorm_gate_bwd(x, z, weight, rstd, dy)


def _rmsnorm_gate_bwd_fake(x, z, weight, rstd, dy):
    return torch.empty_like(x), torch.empty_like(z), torch.empty_like(weight)


_rmsnorm_gate_bwd_op = kernel_op("hypenet::rmsnorm_gate_bwd", _rmsnorm_gate_bwd, _rmsnorm_gate_bwd_fake)


def _rmsnorm_gate_setup(ctx, inputs, output):
    x, z, weight, _ = inputs
    ctx.save_for_backward(x, z, weight, output[1])


def _rmsnorm_gate_backward(ctx, dy, drstd):
    x, z, weight, rstd = ctx.saved_tensors
    dx, dz, dweight = _rmsnorm_gate_bwd_op(x, z, weight, rstd, dy.contiguous())
    return dx, dz, dweight, None


_rmsnorm_gate_fwd_op = kernel_op("hypenet::rmsnorm_gate_fwd", _rmsnorm_gate_fwd, _rmsnorm_gate_fwd_fake,
                                 setup_context=_rmsnorm_gate_setup, backward=_rmsnorm_gate_backward)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, *,
                 eps: float = 1e-6, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm over D (one weight [D] shared by the heads), then rotate-half RoPE.

    Args:
        q (Tensor): [B, T, Hq, D]; k (Tensor): [B, T, Hk, D]; same dtype.
        q_weight, k_weight (Tensor): [D].
        cos, sin (Tensor): [B or 1, T, D] rotary tables (transformers' layout: each half of D repeated).
    Returns:
        (q_out, k_out) shaped and typed like q and k. Differentiable in q, k and the weights.
    """
    check_tensor("q", q, ndim=4)
    device = q.device
    check_tensor("k", k, ndim=4, device=device)
    check_same_dtype(("q", "k"), (q, k))
    B, T, _, D = q.shape
    if D % 2:
        raise ValueError(f"rotate-half RoPE needs an even head dim, got D = {D}")
    check_shape("k", k, (B, T, None, D), "[B, T, Hk, D] with q's B, T and D")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        check_tensor(name, w, ndim=1, device=device)
        check_shape(name, w, (D,), "[D]")
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(name, table, ndim=3, device=device)
        if table.shape[0] not in (1, B) or tuple(table.shape[1:]) != (T, D):
            raise ValueError(f"{name} must have shape [B or 1, T, D] = [{B} or 1, {T}, {D}], got {tuple(table.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    _check_eps(eps)
    reasons = {"reference": None,
               "triton": triton_kernel_reason(NORM_MODULE, device, q, k, q_weight, k_weight, cos, sin)}
    chosen = select_backend("qk_norm_rope", backend, device, reasons)
    if chosen == "reference":
        return qk_norm_rope_ref(q, k, q_weight, k_weight, cos, sin, eps)
    q_out, k_out, _, _ = _qk_norm_rope_fwd_op(q, k, q_weight, k_weight, cos, sin, float(eps))
    return q_out, k_out


def _qk_norm_rope_fwd(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                      eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return load_kernel_module(NORM_MODULE).qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, eps)


def _qk_norm_rope_fwd_fake(q, k, q_weight, k_weight, cos, sin, eps):
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(q.shape[:-1], dtype=torch.float32),
            k.new_empty(k.shape[:-1], dtype=torch.float32))


def _qk_norm_rope_bwd(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                      q_rstd: Tensor, k_rstd: Tensor, dq_out: Tensor,
                      dk_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return load_kernel_module(NORM_MODULE).qk_norm_rope_bwd(q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd,
                                                            dq_out, dk_out)


def _qk_norm_rope_bwd_fake(q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd, dq_out, dk_out):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(q_weight), torch.empty_like(k_weight)


_qk_norm_rope_bwd_op = kernel_op("hypenet::qk_norm_rope_bwd", _qk_norm_rope_bwd, _qk_norm_rope_bwd_fake)


def _qk_norm_rope_setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, _ = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, output[2], output[3])


def _qk_norm_rope_backward(ctx, dq_out, dk_out, dq_rstd, dk_rstd):
    q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd = ctx.saved_tensors
    dq_out = torch.zeros_like(q) if dq_out is None else dq_out.contiguous()
    dk_out = torch.zeros_like(k) if dk_out is None else dk_out.contiguous()
    dq, dk, dq_weight, dk_weight = _qk_norm_rope_bwd_op(q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd, dq_out,
                                                        dk_out)
    return dq, dk, dq_weight, dk_weight, None, None, None


_qk_norm_rope_fwd_op = kernel_op("hypenet::qk_norm_rope_fwd", _qk_norm_rope_fwd, _qk_norm_rope_fwd_fake,
                                 setup_context=_qk_norm_rope_setup, backward=_qk_norm_rope_backward)
