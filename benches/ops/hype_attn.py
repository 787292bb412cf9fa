"""HyPE attention training / prefill op: hypenet Triton kernels vs PyTorch SDPA and FlexAttention, causal,
Hq=16, Hkv=8, D=128, alpha=500, bf16.

Rows per shape: forward, and forward + backward (gradients of q, k, v). TFLOP/s count half the T x T square
(benches.common.causal_attention_flops). Backends:
- "hypenet-triton": the kernel launchers (triton_ops.hype_attention) called directly;
  "hypenet-triton op": `hypenet.ops.hype_attn(backend="triton")` through autograd (validation, dispatch included);
- "sdpa-cudnn no-hype": cuDNN SDPA without the HyPE scale (what HyPE would cost nothing against);
- "sdpa-cudnn prescale" / "sdpa-flash prescale": the published recipe, q * s_t in fp32 cast back to bf16 (timed)
  then SDPA;
- "flex hype" (the anchor of the speedup column): torch.compile'd FlexAttention with a causal block mask and a
  score_mod multiplying by s_t.
SDPA baselines take [B, H, T, D] inputs (their native layout) and GQA through enable_gqa; when a backend refuses
GQA, k and v are expanded to Hq heads outside the timed region (noted as "gqa=repeat": their dk, dv then skip
the reduction over the group). Gradients come from torch.autograd.grad, so nothing accumulates between calls.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from benches.common import add_rates, add_speedups, bench_ms, causal_attention_flops, check_close
from hypenet.ops.reference.hype_attention import hype_attn_ref, hype_logit_scale

HQ, HKV, D = 16, 8, 128
ALPHA = 500.0
DTYPE = torch.bfloat16
SHAPES = [(4, 4096), (1, 16384), (1, 65536)]
QUICK_SHAPES = [(1, 16384)]
OURS = "hypenet-triton"
OURS_OP = "hypenet-triton op"
FLEX = "flex hype"


def _inputs(B: int, T: int, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(DTYPE)

    x = {"q": randn(B, T, HQ, D), "k": randn(B, T, HKV, D), "v": randn(B, T, HKV, D), "do": randn(B, T, HQ, D)}
    x.update({f"{n}_bhtd": x[n].transpose(1, 2).contiguous() for n in ("q", "k", "v", "do")})
    x["s_t"] = hype_logit_scale(torch.arange(T, device="cuda"), ALPHA)  # (T,) float32
    return x


def _grads(o: torch.Tensor, leaves: list, do: torch.Tensor, backward: bool):
    return torch.autograd.grad(o, leaves, do) if backward else o


def _ours(backward: bool) -> Callable:
    from triton_ops.hype_attention.bwd import hype_attn_bwd
    from triton_ops.hype_attention.fwd import hype_attn_fwd

    def run(x):
        o, lse = hype_attn_fwd(x["q"], x["k"], x["v"], ALPHA, None, True, None, None)
        if backward:
            return hype_attn_bwd(x["q"], x["k"], x["v"], o, lse, x["do"], ALPHA, None, True, None, None)
        return o
    return run


def _ours_op(backward: bool) -> Callable:
    import hypenet.ops

    def run(x):
        leaves = [x[n].requires_grad_(backward) for n in ("q", "k", "v")]
        o = hypenet.ops.hype_attn(*leaves, alpha=ALPHA, backend="triton")
        return _grads(o, leaves, x["do"], backward)
    return run


def _sdpa(backend, prescale: bool, backward: bool, gqa: str) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def run(x):
        names = ("q_bhtd", "k_bhtd", "v_bhtd") if gqa == "native" else ("q_bhtd", "k_rep", "v_rep")
        leaves = [x[n].requires_grad_(backward) for n in names]
        q = leaves[0]
        if prescale:
            q = (q.float() * x["s_t"][:, None]).to(DTYPE)
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(q, leaves[1], leaves[2], is_causal=True, enable_gqa=gqa == "native")
        return _grads(o, leaves, x["do_bhtd"], backward)
    return run


def _flex(backward: bool) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    log_alpha = math.log(ALPHA)
    masks = {}

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def hype(score, b, h, q_idx, kv_idx):
        return score * (torch.log(q_idx.to(torch.float32) + ALPHA) / log_alpha)

    def run(x):
        T = x["q"].shape[1]
        if T not in masks:
            masks[T] = create_block_mask(causal, None, None, T, T, device="cuda")
        leaves = [x[n].requires_grad_(backward) for n in ("q_bhtd", "k_bhtd", "v_bhtd")]
        o = compiled(*leaves, score_mod=hype, block_mask=masks[T], enable_gqa=True)
        return _grads(o, leaves, x["do_bhtd"], backward)
    return run


def _try(name: str, make: Callable, x: dict, skipped: dict) -> Callable | None:
    """The backend, or None (reason in `skipped`) when it cannot run here."""
    try:
        fn = make()
        fn(x)
        torch.cuda.synchronize()
        return fn
    except Exception as err:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        return None


def _backends(x: dict, backward: bool, skipped: dict) -> dict:
    from torch.nn.attention import SDPBackend

    found = {}
    for name, make in ((OURS, lambda: _ours(backward)), (OURS_OP, lambda: _ours_op(backward))):
        fn = _try(name, make, x, skipped)
        if fn is not None:
            found[name] = fn
    for label, backend, prescale in (("sdpa-cudnn no-hype", SDPBackend.CUDNN_ATTENTION, False),
                                     ("sdpa-cudnn prescale", SDPBackend.CUDNN_ATTENTION, True),
                                     ("sdpa-flash prescale", SDPBackend.FLASH_ATTENTION, True)):
        fn = _try(label, lambda: _sdpa(backend, prescale, backward, "native"), x, skipped)
        if fn is None:
            if "k_rep" not in x:
                x["k_rep"] = x["k_bhtd"].repeat_interleave(HQ // HKV, dim=1)
                x["v_rep"] = x["v_bhtd"].repeat_interleave(HQ // HKV, dim=1)
            fn = _try(f"{label} gqa=repeat", lambda: _sdpa(backend, prescale, backward, "repeat"), x, skipped)
            label = f"{label} gqa=repeat"
        if fn is not None:
            found[label] = fn
    fn = _try(FLEX, lambda: _flex(backward), x, skipped)
    if fn is not None:
        found[FLEX] = fn
    return found


def _check() -> None:
    """Forward and gradients of our kernels against the fp64 reference: B2 T1000 (ragged tiles) and a packed
    batch of 3 sequences with chunked-prefill offsets (T < S)."""
    g = torch.Generator(device="cuda").manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(DTYPE)

    from triton_ops.hype_attention.bwd import hype_attn_bwd
    from triton_ops.hype_attention.fwd import hype_attn_fwd
    cases = [(2, 1000, 1000, None, None),
             (1, 700, 1500, torch.tensor([0, 100, 101, 700], device="cuda", dtype=torch.int32),
              torch.tensor([0, 300, 301, 1500], device="cuda", dtype=torch.int32))]
    for B, T, S, cu_q, cu_k in cases:
        q, k, v, do = randn(B, T, HQ, D), randn(B, S, HKV, D), randn(B, S, HKV, D), randn(B, T, HQ, D)
        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        o_ref = hype_attn_ref(*leaves, ALPHA, None, True, cu_q, cu_k)
        grads_ref = torch.autograd.grad(o_ref, leaves, do.double())
        o, lse = hype_attn_fwd(q, k, v, ALPHA, None, True, cu_q, cu_k)
        grads = hype_attn_bwd(q, k, v, o, lse, do, ALPHA, None, True, cu_q, cu_k)
        what = "packed" if cu_q is not None else "dense"
        check_close(f"{OURS} {what} o", o, o_ref, 1e-2)
        for name, got, ref in zip(("dq", "dk", "dv"), grads, grads_ref):
            check_close(f"{OURS} {what} {name}", got, ref, 1e-2)
    print("# checked hypenet-triton: o, dq, dk, dv match the fp64 reference (dense B2 T1000, packed 3 sequences)",
          flush=True)


def run(quick: bool) -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("the hype_attn benchmark needs a GPU")
    _check()
    rows = []
    for B, T in QUICK_SHAPES if quick else SHAPES:
        x = _inputs(B, T, seed=B * T)
        shape = f"B{B} T{T} Hq{HQ} Hkv{HKV} D{D} bf16"
        for backward in (False, True):
            skipped = {}
            backends = _backends(x, backward, skipped)
            for name, reason in skipped.items():
                print(f"# {shape}: skipped {name}: {reason}", flush=True)
            flops = causal_attention_flops(B, HQ, T, D, backward)
            for name, fn in backends.items():
                row = {"op": "hype_attn", "shape": shape, "backend": name, "pass": "fwd+bwd" if backward else "fwd"}
                row["ms"] = bench_ms(lambda fn=fn, x=x: fn(x))
                rows.append(add_rates(row, flops=flops))
                print(f"# {shape} {row['pass']} {name}: {row['ms']:.3f} ms {row['tflops']:.0f} TFLOP/s", flush=True)
        del x
        torch.cuda.empty_cache()
    add_speedups(rows, FLEX)
    return rows
