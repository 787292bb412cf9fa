"""The public op API: bad input raises a clear error naming the argument, dispatch follows the override, the
reference path traces under torch.compile(fullgraph=True), torch.func transforms run the reference, and empty
dimensions give empty results on every backend."""

from __future__ import annotations

import pytest
import torch

from hypenet import ops
from tests.conftest import triton_device
from tests.strategies import log_decays, randn

F32 = torch.float32


def lightning_inputs(B=2, T=6, H=2, K=4, V=4, dtype=F32):
    return (randn((B, T, H, K), dtype, "cpu", 0), randn((B, T, H, K), dtype, "cpu", 1),
            randn((B, T, H, V), dtype, "cpu", 2), log_decays(H, 1.0, 0))


def hype_inputs(B=2, T=5, S=7, Hq=4, Hkv=2, D=8, dtype=F32):
    return (randn((B, T, Hq, D), dtype, "cpu", 0), randn((B, S, Hkv, D), dtype, "cpu", 1),
            randn((B, S, Hkv, D), dtype, "cpu", 2))


def decode_inputs(B=2, Tq=1, S_max=8, Hq=4, Hkv=2, D=8):
    q = randn((B, Tq, Hq, D), F32, "cpu", 0)
    cache = randn((B, S_max, Hkv, D), F32, "cpu", 1)
    return q, cache, cache.clone(), torch.tensor([3, 8], dtype=torch.int32)


def norm_inputs(B=2, T=3, H=2, D=8):
    q, k = randn((B, T, H, D), F32, "cpu", 0), randn((B, T, 1, D), F32, "cpu", 1)
    w = torch.ones(D)
    angles = randn((1, T, D // 2), F32, "cpu", 2)
    return q, k, w, w, torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)


def _lightning(**changes):
    q, k, v, g = lightning_inputs()
    args = dict(q=q, k=k, v=v, log_decay=g)
    args.update(changes)
    return lambda: ops.lightning_attn(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("log_decay"), **args)


def _step(**changes):
    q, k, v, g = lightning_inputs(T=1)
    args = dict(q=q, k=k, v=v, log_decay=g, state=torch.zeros(3, 2, 4, 4))
    args.update(changes)
    return lambda: ops.lightning_attn_step(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("log_decay"),
                                           args.pop("state"), **args)


def _hype(**changes):
    q, k, v = hype_inputs()
    args = dict(q=q, k=k, v=v)
    args.update(changes)
    return lambda: ops.hype_attn(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def _decode(**changes):
    q, kc, vc, lens = decode_inputs()
    args = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens)
    args.update(changes)
    return lambda: ops.hype_attn_decode(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
                                        args.pop("cache_seqlens"), **args)


BAD_CALLS = {
    "lightning k shape": (_lightning(k=torch.randn(2, 6, 2, 5)), ValueError, "k"),
    "lightning q not a tensor": (_lightning(q=[1.0]), TypeError, "q"),
    "lightning int dtype": (_lightning(v=torch.ones(2, 6, 2, 4, dtype=torch.int32)), TypeError, "v"),
    "lightning mixed dtypes": (_lightning(k=torch.randn(2, 6, 2, 4, dtype=torch.float16)), TypeError, "k"),
    "lightning positive decay": (_lightning(log_decay=torch.tensor([-0.1, 0.2])), ValueError, "log_decay"),
    "lightning nan decay": (_lightning(log_decay=torch.tensor([-0.1, float("nan")])), ValueError, "log_decay"),
    "lightning decay dtype": (_lightning(log_decay=torch.tensor([-0.1, -0.2], dtype=torch.float64)), TypeError,
                              "log_decay"),
    "lightning decay heads": (_lightning(log_decay=torch.tensor([-0.1, -0.2, -0.3])), ValueError, "log_decay"),
    "lightning cu_seqlens with B > 1": (_lightning(cu_seqlens=torch.tensor([0, 6])), ValueError, "cu_seqlens"),
    "lightning state shape": (_lightning(initial_state=torch.zeros(3, 2, 4, 4)), ValueError, "initial_state"),
    "lightning negative scale": (_lightning(scale=-1.0), ValueError, "scale"),
    "lightning unknown backend": (_lightning(backend="metal"), ValueError, "backend"),
    "step duplicate slots": (_step(state_indices=torch.tensor([1, 1])), ValueError, "state_indices"),
    "step slot out of range": (_step(state_indices=torch.tensor([0, 3])), ValueError, "state_indices"),
    "step state dtype": (_step(state=torch.zeros(3, 2, 4, 4, dtype=torch.float16)), TypeError, "state"),
    "step state not contiguous": (_step(state=torch.zeros(3, 2, 4, 4).transpose(2, 3)), ValueError, "state"),
    "step pool too small": (_step(state=torch.zeros(1, 2, 4, 4)), ValueError, "state"),
    "hype gqa heads": (_hype(k=torch.randn(2, 7, 3, 8), v=torch.randn(2, 7, 3, 8)), ValueError, "Hkv"),
    "hype head dim": (_hype(k=torch.randn(2, 7, 2, 4), v=torch.randn(2, 7, 2, 4)), ValueError, "head dim"),
    "hype more queries than keys": (_hype(q=torch.randn(2, 9, 4, 8)), ValueError, "T <= S"),
    "hype alpha <= 1": (_hype(alpha=1.0), ValueError, "alpha"),
    "hype alpha inf": (_hype(alpha=float("inf")), ValueError, "alpha"),
    "hype only cu_seqlens_q": (_hype(cu_seqlens_q=torch.tensor([0, 5])), ValueError, "cu_seqlens_k"),
    "decode lengths beyond cache": (_decode(cache_seqlens=torch.tensor([3, 9], dtype=torch.int32)), ValueError,
                                    "cache_seqlens"),
    "decode lengths below Tq": (_decode(cache_seqlens=torch.tensor([0, 2], dtype=torch.int32)), ValueError,
                                "cache_seqlens"),
    "decode block out of range": (_decode(k_cache=torch.randn(4, 2, 2, 8), v_cache=torch.randn(4, 2, 2, 8),
                                          block_table=torch.tensor([[0, 1, 2, 4], [0, 1, 2, 3]], dtype=torch.int32)),
                                  ValueError, "block_table"),
    "decode float lengths": (_decode(cache_seqlens=torch.tensor([3.0, 8.0])), TypeError, "cache_seqlens"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_naming_the_argument(case):
    call, error, needle = BAD_CALLS[case]
    with pytest.raises(error, match=needle):
        call()


def test_packed_offsets_are_checked():
    q, k, v, g = lightning_inputs(B=1, T=6)
    for offsets in ([0, 3, 3, 6], [0, 4, 2, 6], [1, 6], [0, 5]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            ops.lightning_attn(q, k, v, g, cu_seqlens=torch.tensor(offsets))
    qh, kh, vh = hype_inputs(B=1, T=5, S=7)
    with pytest.raises(ValueError, match="at least as many keys"):
        ops.hype_attn(qh, kh, vh, cu_seqlens_q=torch.tensor([0, 4, 5]), cu_seqlens_k=torch.tensor([0, 2, 7]))


def test_norm_ops_validate():
    q, k, wq, wk, cos, sin = norm_inputs()
    with pytest.raises(ValueError, match="cos"):
        ops.qk_norm_rope(q, k, wq, wk, cos[:, :2], sin)
    with pytest.raises(ValueError, match="q_weight"):
        ops.qk_norm_rope(q, k, torch.ones(4), wk, cos, sin)
    with pytest.raises(ValueError, match="even head dim"):
        ops.qk_norm_rope(q[..., :7], k[..., :7], torch.ones(7), torch.ones(7), cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="weight"):
        ops.rmsnorm_gate(q, q, torch.ones(4))
    with pytest.raises(ValueError, match="eps"):
        ops.rmsnorm_gate(q, q, torch.ones(8), eps=-1.0)


def test_forced_backend_that_cannot_run_raises_with_reason(monkeypatch):
    q, k, v, g = lightning_inputs()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run these inputs: CUDA kernels need CUDA tensors"):
        ops.lightning_attn(q, k, v, g, backend="cuda")
    with pytest.raises(ValueError, match="backend 'triton' cannot run"):
        ops.lightning_attn(q, k, v, g, backend="triton")
    monkeypatch.setenv("HYPENET_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend 'cuda'"):
        ops.hype_attn(*hype_inputs())
    monkeypatch.setenv("HYPENET_BACKEND", "tpu")
    with pytest.raises(ValueError, match="HYPENET_BACKEND"):
        ops.hype_attn(*hype_inputs())


def test_gpu_auto_order_prefers_cuda(monkeypatch):
    """Auto on a GPU takes the first usable backend (cuda > triton), skips the ones that cannot run, and a
    requested one still wins."""
    from hypenet.ops.dispatch import select_backend
    monkeypatch.delenv("HYPENET_BACKEND", raising=False)
    gpu = torch.device("cuda", 0)
    both = {"reference": None, "triton": None, "cuda": None}
    assert select_backend("op", None, gpu, both) == "cuda"
    assert select_backend("op", None, gpu, dict(both, cuda="no")) == "triton"
    assert select_backend("op", "triton", gpu, both) == "triton"
    no_triton = dict(both, triton="no")
    assert select_backend("op", None, gpu, dict(no_triton, cuda="no")) == "reference"


def test_cpu_auto_dispatch_is_the_reference(monkeypatch):
    """On the CPU auto never picks the interpreter, even when TRITON_INTERPRET=1."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, g = lightning_inputs()
    o, _ = ops.lightning_attn(q, k, v, g)
    o_ref, _ = ops.lightning_attn(q, k, v, g, backend="reference")
    assert torch.equal(o, o_ref)


def _lightning_loss(q, k, v, g, backend=None):
    o, _ = ops.lightning_attn(q, k, v, g, backend=backend)
    return (o * o).sum()


def _check_torch_func_matches_autograd(q, k, v, g):
    q_leaf = q.clone().requires_grad_()
    expected = torch.autograd.grad(_lightning_loss(q_leaf, k, v, g, "reference"), q_leaf)[0]
    torch.testing.assert_close(torch.func.grad(_lightning_loss)(q, k, v, g), expected)
    per_row = torch.func.vmap(_lightning_loss, in_dims=(0, None, None, None))(torch.stack([q, 2 * q]), k, v, g)
    looped = [_lightning_loss(x, k, v, g, "reference") for x in (q, 2 * q)]
    torch.testing.assert_close(per_row, torch.stack(looped))


def test_torch_func_transforms_run_the_reference_and_refuse_a_forced_kernel(monkeypatch):
    """torch.func.grad and vmap give what autograd and a loop give; a kernel backend asked for under a transform
    raises naming the transform (the kernels read plain tensors' memory)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, g = lightning_inputs(K=64, V=64)
    _check_torch_func_matches_autograd(q, k, v, g)
    with pytest.raises(ValueError, match="backend 'triton' cannot run these inputs: under a torch.func transform"):
        torch.func.grad(_lightning_loss)(q, k, v, g, "triton")


@pytest.mark.cuda
def test_gpu_torch_func_transforms_fall_back_from_the_kernels_to_the_reference():
    """On a GPU auto picks the Triton kernels for these inputs, except under a torch.func transform."""
    q, k, v, g = (t.cuda() for t in lightning_inputs(T=70, K=64, V=64))
    _check_torch_func_matches_autograd(q, k, v, g)


# Calls with an empty dimension: (input shapes, how many leading inputs are differentiable, call).
EMPTY_DIMS = {
    "lightning_attn T=0": ([(1, 0, 2, 64)] * 3, 3, lambda x, b: ops.lightning_attn(
        *x, -torch.rand(2, device=x[0].device), backend=b)[0]),
    "lightning_attn_step B=0": ([(0, 1, 2, 64)] * 3, 0, lambda x, b: ops.lightning_attn_step(
        *x, -torch.rand(2, device=x[0].device), torch.zeros(1, 2, 64, 64, device=x[0].device), backend=b)),
    "hype_attn B=0": ([(0, 3, 2, 64)] * 3, 3, lambda x, b: ops.hype_attn(*x, backend=b)),
    "hype_attn_decode B=0": ([(0, 1, 2, 64), (0, 8, 2, 64), (0, 8, 2, 64)], 0, lambda x, b: ops.hype_attn_decode(
        *x, torch.zeros(0, dtype=torch.int32, device=x[0].device), backend=b)),
    "rmsnorm_gate C=0": ([(2, 3, 0), (2, 3, 0), (0,)], 3, lambda x, b: ops.rmsnorm_gate(*x, backend=b)),
    "qk_norm_rope Hk=0": ([(1, 5, 4, 64), (1, 5, 0, 64), (64,), (64,), (1, 5, 64), (1, 5, 64)], 4,
                          lambda x, b: ops.qk_norm_rope(*x, backend=b)),
    "qk_norm_rope Hq=0": ([(1, 5, 0, 64), (1, 5, 2, 64), (64,), (64,), (1, 5, 64), (1, 5, 64)], 4,
                          lambda x, b: ops.qk_norm_rope(*x, backend=b)),
    "qk_norm_rope D=0": ([(1, 5, 2, 0), (1, 5, 2, 0), (0,), (0,), (1, 5, 0), (1, 5, 0)], 4,
                         lambda x, b: ops.qk_norm_rope(*x, backend=b)),
}


@pytest.mark.parametrize("case", sorted(EMPTY_DIMS))
def test_empty_dimensions_give_the_reference_results_on_the_kernel_backend(case):
    """Empty dimensions run on the kernels as on the reference: same outputs, and gradients where differentiable."""
    device = triton_device()
    dtype = torch.float16 if device == "cuda" else F32
    shapes, differentiable, call = EMPTY_DIMS[case]
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        inputs = [torch.randn(shape, dtype=dtype, device=device).requires_grad_(i < differentiable)
                  for i, shape in enumerate(shapes)]
        outputs = call(inputs, backend)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grads = ()
        if differentiable:
            loss = sum(o.float().sum() for o in outputs)
            grads = torch.autograd.grad(loss, inputs[:differentiable])
        results[backend] = (outputs, grads)
    got_all, want_all = (sum(results[b], ()) for b in ("triton", "reference"))
    assert len(got_all) == len(want_all), f"{len(got_all)} results on the kernels, {len(want_all)} on the reference"
    for got, want in zip(got_all, want_all):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_reference_backend_is_differentiable():
    q, k, v, g = (t.double().requires_grad_(t.dim() == 4) for t in lightning_inputs())
    h0 = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: ops.lightning_attn(*a, g.float(), initial_state=h0, output_final_state=True),
                             (q, k, v), eps=1e-6, atol=1e-6)
    qh, kh, vh = (t.double().requires_grad_() for t in hype_inputs(T=3, S=4, D=4))
    torch.autograd.gradcheck(lambda a, b, c: ops.hype_attn(a, b, c, alpha=20.0), (qh, kh, vh), eps=1e-6, atol=1e-6)


def test_compile_fullgraph_traces_the_ops():
    q, k, v, g = lightning_inputs()
    qh, kh, vh = hype_inputs()
    x, z = randn((2, 3, 8), F32, "cpu", 5), randn((2, 3, 8), F32, "cpu", 6)

    def block(q, k, v, g, qh, kh, vh, x, z):
        o, s = ops.lightning_attn(q, k, v, g, output_final_state=True)
        return o.sum() + s.sum() + ops.hype_attn(qh, kh, vh, alpha=500.0).sum() + ops.rmsnorm_gate(
            x, z, torch.ones(8)).sum()

    args = (q, k, v, g, qh, kh, vh, x, z)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), block(*args))
