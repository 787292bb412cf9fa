"""Lightning Attention training op (chunked, constant decay): hypenet Triton kernels vs fla's chunk_simple_gla
(fla-core, g_gamma = the per-head log decay), H=16, K=V=128, bf16, ALiBi-slope decays of the model.

Rows per shape: forward, and forward + backward (gradients of q, k, v). Anchors: fla on the same bf16 inputs
("fla chunk_simple_gla", the speedup column), and fla on q, k, v already cast to fp32 ("fla chunk_simple_gla
fp32": what the published model runs; the cast itself is not timed). hypenet rows call the kernel launchers
(triton_ops.lightning.chunk) directly; "hypenet op" goes through `hypenet.ops.lightning_attn` and autograd
(validation and dispatch included; auto dispatch runs the CUDA scan where hypenet._C holds it and it takes the
inputs, the Triton kernels otherwise), fla through its autograd function. "hypenet-cuda" rows (when hypenet._C holds
the kernel) run the scans' output stage with the CUDA kernel `hypenet_cuda.lightning_chunk_scan` (packed batches:
`lightning_chunk_scan_packed`) and the segment stages with the Triton ones. Gradients come from torch.autograd.grad,
so nothing accumulates into .grad between calls. Bandwidth and "pct_floor" count the fewest bytes
(benches.common.lightning_chunk_bytes: inputs read once, outputs written once).

"packed" rows: the 32768 tokens of B8 T4096 packed in one row (cu_seqlens) as 8 ragged sequences and as 64 x 512,
against the equal-length batch of the same tokens.

"kernel_ms" is the GPU time of the kernels alone (torch.profiler): a packed call launches up to five kernels, and
on a slow host its do_bench time ("ms") can be launch-bound where the equal-length batch (one kernel) is not.
"host_ms" is the host time to issue one call (validation, dispatch, autograd and launches): where it exceeds
kernel_ms, "ms" measures the host.

Runtime: fla autotunes each of its kernels on first use per dtype, which takes several minutes on a fresh machine;
allow the module >= 10 minutes there, or start from the autotuning results of an earlier run (Triton keeps them in
its cache; benches/gpu_suite.sh saves and restores them, see SUITE_AUTOTUNE there).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from benches.common import (add_rates, add_speedups, bench_ms, check_close, host_ms, kernel_ms,
                            lightning_chunk_bytes)
from hypenet.ops.reference.lightning import lightning_attn_ref

H, D = 16, 128
DTYPE = torch.bfloat16
SHAPES = [(8, 4096), (2, 16384), (1, 65536)]
QUICK_SHAPES = [(8, 4096)]
# Packed batches holding the 32768 tokens of B8 T4096: ragged lengths, and many short sequences.
PACKED_CASES = {"8 ragged": [8192, 1024, 6144, 512, 3072, 2560, 7168, 4096], "64 x 512": [512] * 64}
FLA = "fla chunk_simple_gla"
FLA_FP32 = "fla chunk_simple_gla fp32"
OURS = "hypenet-triton"
OURS_OP = "hypenet op"
OURS_CUDA = "hypenet-cuda"


def _log_decay() -> torch.Tensor:
    # The model's decays for H = 16 (SPEC 1.1): log gamma_h = -2^(-8h/H), h = 1..H.
    return -torch.exp2(-8.0 * torch.arange(1, H + 1, device="cuda") / H)


def _inputs(B: int, T: int, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(DTYPE)

    # Unit-norm-ish q, k (the layer applies RMSNorm then RoPE) keep the outputs O(1).
    return {"q": randn(B, T, H, D), "k": randn(B, T, H, D), "v": randn(B, T, H, D), "do": randn(B, T, H, D)}


def _ours(backward: bool, cu_seqlens: Optional[torch.Tensor], cuda_output_stage: bool = False) -> Callable:
    from triton_ops.lightning.chunk import lightning_chunk_bwd, lightning_chunk_train_fwd

    def run(x, g, scale):
        o, _, starts, tables = lightning_chunk_train_fwd(x["q"], x["k"], x["v"], g, scale, None, cu_seqlens, False,
                                                         cuda_output_stage=cuda_output_stage)
        if backward:  # as the op's autograd does: the backward reuses the forward's start states and packed tables
            return lightning_chunk_bwd(x["q"], x["k"], x["v"], g, scale, None, cu_seqlens, x["do"], None,
                                       start_states=starts, packed_tables=tables,
                                       cuda_output_stage=cuda_output_stage)[:3]
        return o
    return run


def _has_cuda_scan(cu_seqlens: Optional[torch.Tensor]) -> bool:
    from hypenet.ops.cuda_ext import cuda_op_available
    from hypenet.ops.lightning import chunk_scan_op
    return cuda_op_available(chunk_scan_op(cu_seqlens is not None))


def _ours_op(backward: bool, cu_seqlens: Optional[torch.Tensor]) -> Callable:
    import hypenet.ops

    def run(x, g, scale):
        leaves = [x[n].requires_grad_(backward) for n in ("q", "k", "v")]
        o, _ = hypenet.ops.lightning_attn(*leaves, g, scale=scale, cu_seqlens=cu_seqlens)
        if backward:
            return torch.autograd.grad(o, leaves, x["do"])
        return o
    return run


def _fla(backward: bool, cu_seqlens: Optional[torch.Tensor], fp32: bool) -> Callable:
    from fla.ops.simple_gla import chunk_simple_gla

    def run(x, g, scale):
        names = ("q32", "k32", "v32") if fp32 else ("q", "k", "v")
        leaves = [x[n].requires_grad_(backward) for n in names]
        o, _ = chunk_simple_gla(*leaves, g_gamma=g, scale=scale, cu_seqlens=cu_seqlens)
        if backward:
            return torch.autograd.grad(o, leaves, x["do32"] if fp32 else x["do"])
        return o
    return run


def _backends(backward: bool, cu_seqlens: Optional[torch.Tensor], with_fp32: bool) -> tuple[dict, dict]:
    backends, skipped = {OURS: _ours(backward, cu_seqlens), OURS_OP: _ours_op(backward, cu_seqlens)}, {}
    if _has_cuda_scan(cu_seqlens):
        backends[OURS_CUDA] = _ours(backward, cu_seqlens, cuda_output_stage=True)
    try:
        backends[FLA] = _fla(backward, cu_seqlens, fp32=False)
        if with_fp32:
            backends[FLA_FP32] = _fla(backward, cu_seqlens, fp32=True)
    except ImportError as err:
        skipped[FLA] = str(err)
    return backends, skipped


def _check(log_decay: torch.Tensor, scale: float) -> None:
    """Our kernels (equal-length and packed, forward and gradients) against the fp64 reference on 4096 tokens."""
    g = torch.Generator(device="cuda").manual_seed(99)
    B, T = 2, 2048
    x = {n: torch.randn(B, T, H, D, generator=g, device="cuda").to(DTYPE) for n in ("q", "k", "v", "do")}
    for cu_seqlens in (None, torch.tensor([0, 1000, 1001, 4096], device="cuda", dtype=torch.int32)):
        y = {n: t.reshape(1, B * T, H, D) for n, t in x.items()} if cu_seqlens is not None else x
        leaves = [y[n].double().requires_grad_() for n in ("q", "k", "v")]
        o_ref, _ = lightning_attn_ref(*leaves, log_decay, scale, None, False, cu_seqlens)
        grads_ref = torch.autograd.grad(o_ref, leaves, y["do"].double())
        cuda_stages = (False, True) if _has_cuda_scan(cu_seqlens) else (False,)
        for cuda_output_stage in cuda_stages:
            o = _ours(False, cu_seqlens, cuda_output_stage)(y, log_decay, scale)
            grads = _ours(True, cu_seqlens, cuda_output_stage)(y, log_decay, scale)
            what = f"{OURS_CUDA if cuda_output_stage else OURS} {'packed' if cu_seqlens is not None else 'dense'}"
            check_close(f"{what} o", o, o_ref.detach(), 1e-2)
            for name, got, ref in zip(("dq", "dk", "dv"), grads, grads_ref):
                check_close(f"{what} {name}", got, ref, 1e-2)
    print("# checked: o, dq, dk, dv match the fp64 reference (dense B2 T2048, packed 3 sequences; hypenet-cuda "
          "when built)", flush=True)


def _time_rows(shape: str, backends: dict, x: dict, log_decay: torch.Tensor, scale: float, backward: bool,
               nbytes: int) -> list[dict]:
    rows = []
    for name, fn in backends.items():
        row = {"op": "lightning_attn", "shape": shape, "backend": name, "pass": "fwd+bwd" if backward else "fwd"}
        row["ms"] = bench_ms(lambda fn=fn: fn(x, log_decay, scale))
        row["kernel_ms"] = kernel_ms(lambda fn=fn: fn(x, log_decay, scale))
        row["host_ms"] = host_ms(lambda fn=fn: fn(x, log_decay, scale))
        rows.append(add_rates(row, nbytes=nbytes))
        print(f"# {shape} {row['pass']} {name}: {row['ms']:.3f} ms (kernels {row['kernel_ms']:.3f} ms, host "
              f"{row['host_ms']:.3f} ms)", flush=True)
    return rows


def _packed_rows(log_decay: torch.Tensor, scale: float) -> list[dict]:
    """Packed sequences, to set against the equal-length batch holding the same number of tokens."""
    rows = []
    for name, lengths in PACKED_CASES.items():
        total = sum(lengths)
        cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda", dtype=torch.int64)
        x = _inputs(1, total, seed=7)
        shape = f"packed {name}, {total} tokens H{H} D{D} bf16"
        for backward in (False, True):
            backends, _ = _backends(backward, cu_seqlens, with_fp32=False)
            nbytes = lightning_chunk_bytes(1, total, H, D, D, DTYPE.itemsize, backward)
            rows += _time_rows(shape, backends, x, log_decay, scale, backward, nbytes)
    return rows


def run(quick: bool) -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("the lightning_attn benchmark needs a GPU")
    log_decay = _log_decay()
    scale = D ** -0.5
    _check(log_decay, scale)
    rows = []
    for B, T in QUICK_SHAPES if quick else SHAPES:
        x = _inputs(B, T, seed=B * T)
        x.update({f"{n}32": x[n].float() for n in ("q", "k", "v", "do")})
        shape = f"B{B} T{T} H{H} D{D} bf16"
        for backward in (False, True):
            backends, skipped = _backends(backward, None, with_fp32=True)
            for name, reason in skipped.items():
                print(f"# skipped {name}: {reason}", flush=True)
            nbytes = lightning_chunk_bytes(B, T, H, D, D, DTYPE.itemsize, backward)
            rows += _time_rows(shape, backends, x, log_decay, scale, backward, nbytes)
        del x
        torch.cuda.empty_cache()
        if (B, T) == (8, 4096):  # right after the equal-length batch it is compared with
            rows += _packed_rows(log_decay, scale)
    add_speedups(rows, FLA)
    return rows
