"""torch.library.opcheck of every registered kernel op (schema, fake tensors, autograd registration, AOT dispatch),
run on the Triton backend (CPU under TRITON_INTERPRET=1, or the GPU) and on the CUDA backend where it is built."""

from __future__ import annotations

import pytest
import torch

from hypenet import ops
from hypenet.ops.dispatch import cuda_kernel_reason
from tests.strategies import log_decays, randn


def _cases(device: str, dtype: torch.dtype):
    B, T, H, D = 1, 20, 2, 64
    q, k, v = (randn((B, T, H, D), dtype, device, s, 0.5).requires_grad_() for s in range(3))
    g = log_decays(H, 1.0, 0).to(device)
    h0 = randn((B, H, D, D), torch.float32, device, 3, 0.1).requires_grad_()
    cu = torch.tensor([0, 7, 20], device=device, dtype=torch.int32)
    qh = randn((B, T, 4, D), dtype, device, 4, 0.5).requires_grad_()
    state = randn((3, H, D, D), torch.float32, device, 5, 0.1)
    x, z = randn((B, T, 128), dtype, device, 6), randn((B, T, 128), dtype, device, 7)
    w = randn((128,), dtype, device, 8).requires_grad_()
    angles = randn((1, T, D // 2), torch.float32, device, 9)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    wq, wk = randn((D,), dtype, device, 10).requires_grad_(), randn((D,), dtype, device, 11).requires_grad_()
    kc = randn((2, 24, H, D), dtype, device, 12)
    lens = torch.tensor([5, 24], device=device, dtype=torch.int32)
    q_dec = randn((2, 1, 4, D), dtype, device, 13)
    scale = D ** -0.5
    return {
        "lightning_attn_fwd": lambda be: (torch.ops.hypenet.lightning_attn_fwd.default,
                                          (q, k, v, g, scale, h0, True, None, be)),
        "lightning_attn_fwd_packed": lambda be: (torch.ops.hypenet.lightning_attn_fwd.default,
                                                 (q, k, v, g, scale, None, True, cu, be)),
        "lightning_attn_step": lambda be: (torch.ops.hypenet.lightning_attn_step.default,
                                           (q.detach()[:, :1].repeat(2, 1, 1, 1), k.detach()[:, :1].repeat(2, 1, 1, 1),
                                            v.detach()[:, :1].repeat(2, 1, 1, 1), g, state,
                                            torch.tensor([2, 0], device=device, dtype=torch.int32), scale, be)),
        "hype_attn_fwd": lambda be: (torch.ops.hypenet.hype_attn_fwd.default,
                                     (qh, k, v, 500.0, scale, True, None, None, be)),
        "hype_attn_decode": lambda be: (torch.ops.hypenet.hype_attn_decode.default,
                                        (q_dec, kc, kc, lens, 500.0, scale, None, be)),
        "rmsnorm_gate_fwd": lambda be: (torch.ops.hypenet.rmsnorm_gate_fwd.default,
                                        (x.requires_grad_(), z.requires_grad_(), w, 1e-6)),
        "qk_norm_rope_fwd": lambda be: (torch.ops.hypenet.qk_norm_rope_fwd.default,
                                        (qh, k, wq, wk, cos, sin, 1e-6)),
    }


TRITON_OPS = ["lightning_attn_fwd", "lightning_attn_fwd_packed", "lightning_attn_step", "hype_attn_fwd",
              "hype_attn_decode", "rmsnorm_gate_fwd", "qk_norm_rope_fwd"]


@pytest.mark.parametrize("name", TRITON_OPS)
def test_opcheck_triton(name, triton_dev):
    # fp32 on the interpreter (its bf16 dot is broken); bf16 on the GPU
    dtype = torch.bfloat16 if triton_dev == "cuda" else torch.float32
    op, args = _cases(triton_dev, dtype)[name]("triton")
    torch.library.opcheck(op, args)


@pytest.mark.cuda
def test_opcheck_cuda_step():
    op, args = _cases("cuda", torch.bfloat16)["lightning_attn_step"]("cuda")
    q, k, v, _, state = args[:5]
    reason = cuda_kernel_reason("lightning_attn_step", torch.device("cuda"), q, k, v, state)
    if reason is not None:
        pytest.skip(reason)
    torch.library.opcheck(op, args)


def test_compiled_kernel_ops_match_eager(triton_dev):
    """torch.compile(fullgraph=True) around the kernel ops gives the eager values and gradients."""
    dtype = torch.bfloat16 if triton_dev == "cuda" else torch.float32
    q, k, v = (randn((1, 20, 2, 64), dtype, triton_dev, s, 0.5).requires_grad_() for s in range(3))
    g = log_decays(2, 1.0, 0).to(triton_dev)

    def loss(q, k, v):
        o, state = ops.lightning_attn(q, k, v, g, output_final_state=True, backend="triton")
        y = ops.hype_attn(o, k, v, alpha=500.0, backend="triton")
        return y.float().square().sum() + state.sum()

    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager")
    traced = torch.autograd.grad(compiled_loss(q, k, v), (q, k, v))
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b)


def _registered_op_ran(fn, name: str) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(event.name == f"hypenet::{name}" for event in prof.events())


def _rmsnorm_gate_inputs(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Parameter]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, z = randn((1, 5, 128), dtype, device, 0), randn((1, 5, 128), dtype, device, 1)
    return x, z, torch.nn.Parameter(randn((128,), dtype, device, 2))


def test_eager_calls_bypass_the_registered_op(triton_dev):
    """Eager calls run the implementation without the dispatcher, through a plain autograd.Function when autograd
    records them; values and gradients equal those of the registered op."""
    x, z, w = _rmsnorm_gate_inputs(triton_dev)
    dy = randn((1, 5, 128), x.dtype, triton_dev, 3)
    eps = 1e-6

    def call():
        return ops.rmsnorm_gate(x, z, w, eps=eps, backend="triton")

    with torch.no_grad():
        assert not _registered_op_ran(call, "rmsnorm_gate_fwd")
        expected = call()
    assert not _registered_op_ran(call, "rmsnorm_gate_fwd")  # w requires grad: recorded, still not dispatched
    y = call()
    assert y.grad_fn is not None
    torch.testing.assert_close(y.detach(), expected, rtol=0, atol=0)
    y_op, _ = torch.ops.hypenet.rmsnorm_gate_fwd(x, z, w, eps)
    torch.testing.assert_close(torch.autograd.grad(y, w, dy)[0], torch.autograd.grad(y_op, w, dy)[0], rtol=0, atol=0)


def test_double_backward_raises_instead_of_dropping_terms(triton_dev):
    """The kernels' backwards have no derivatives of their own: a loss that differentiates a gradient again (a
    gradient penalty) must fail, not treat the penalty as a constant."""
    x, z, w = _rmsnorm_gate_inputs(triton_dev)
    y = ops.rmsnorm_gate(x, z, w, backend="triton")
    (grad_w,) = torch.autograd.grad(y.float().pow(2).sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (y.float().sum() + grad_w.float().pow(2).sum()).backward()
