"""Lightning Attention decode step: hypenet CUDA and Triton kernels vs the reference and fla's
`fused_recurrent_simple_gla` (fla-core), one new token per row, H=16, K=V=128, bf16 q/k/v, fp32 state.

Bandwidth counts the fewest bytes (benches.common.lightning_step_bytes): each fp32 state read and written once
plus q, k, v, o. The kernels take microseconds, so "ms" is the median over replays of a CUDA graph of many steps
("timing": "graph"; the reference cannot be captured and is timed eagerly); "ms_eager" is the eager median,
launch gaps included. State pools rotate so that every step reads its state from HBM, not L2. fla gets the most
favourable form of its API: states in row order (no slot gather) returned as a new final-state tensor.
"""

from __future__ import annotations

import torch

from benches.common import (add_rates, add_speedups, bench_ms, check_close, lightning_step_bytes, rotating,
                            rotation_count)
from hypenet.ops.reference.lightning import lightning_attn_step_ref

H, K, V, T = 16, 128, 128, 1
DTYPE = torch.bfloat16
BATCHES = [8, 32, 64, 128, 256]
QUICK_BATCHES = [8, 256]
FLA = "fla fused_recurrent_simple_gla"


def _step_inputs(B: int, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, dtype=DTYPE, std=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * std).to(dtype)

    return {
        "q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V),
        "state": randn(B, H, K, V, dtype=torch.float32, std=0.1),
        # Serving pools hand out slots in no particular order.
        "state_indices": torch.randperm(B, generator=g, device="cuda").to(torch.int32),
    }


def _log_decay() -> torch.Tensor:
    # The model's ALiBi-slope decays for H = 16 (SPEC 1.1): log gamma_h = -2^(-8h/H).
    return -torch.exp2(-8.0 * torch.arange(1, H + 1, device="cuda") / H)


def _backends() -> tuple[dict, dict]:
    """name -> step(inputs, log_decay, scale) -> o, and name -> why it is skipped."""
    backends, skipped = {}, {}
    from hypenet.ops.cuda_ext import cuda_ext_error, cuda_op_available
    if cuda_op_available("lightning_attn_step"):
        backends["hypenet-cuda"] = lambda x, g, s: torch.ops.hypenet_cuda.lightning_attn_step(
            x["q"], x["k"], x["v"], g, x["state"], x["state_indices"], s)
    else:
        skipped["hypenet-cuda"] = cuda_ext_error() or "hypenet._C built without lightning_attn_step"
    try:
        from triton_ops.lightning.step import lightning_attn_step as triton_step
        backends["hypenet-triton"] = lambda x, g, s: triton_step(x["q"], x["k"], x["v"], g, x["state"], s,
                                                                 x["state_indices"])
    except ImportError as err:
        skipped["hypenet-triton"] = str(err)
    try:
        from fla.ops.simple_gla import fused_recurrent_simple_gla
        backends[FLA] = lambda x, g, s: fused_recurrent_simple_gla(
            x["q"], x["k"], x["v"], g_gamma=g, scale=s, initial_state=x["state"], output_final_state=True)[0]
    except ImportError as err:
        skipped[FLA] = str(err)
    backends["reference"] = lambda x, g, s: lightning_attn_step_ref(x["q"], x["k"], x["v"], g, x["state"], s,
                                                                    x["state_indices"])
    return backends, skipped


def _check(backends: dict, log_decay: torch.Tensor, scale: float) -> None:
    """Every backend against the fp64 reference on B=8 (fla: its returned final state, in row order)."""
    x = _step_inputs(8, seed=1234)
    rows = x["state_indices"].long()
    state_fp64 = x["state"].double()
    o_fp64 = lightning_attn_step_ref(x["q"].double(), x["k"].double(), x["v"].double(), log_decay, state_fp64,
                                     scale, x["state_indices"])
    for name, step in backends.items():
        if name == FLA:
            from fla.ops.simple_gla import fused_recurrent_simple_gla
            # fla has no slot indices: hand it the states in the order of the rows.
            initial = x["state"][rows].contiguous()
            o, final = fused_recurrent_simple_gla(x["q"], x["k"], x["v"], g_gamma=log_decay, scale=scale,
                                                  initial_state=initial, output_final_state=True)
            check_close(f"{name} final state", final, state_fp64[rows], 1e-5)
        else:
            y = {**x, "state": x["state"].clone()}
            o = step(y, log_decay, scale)
            check_close(f"{name} state", y["state"], state_fp64, 1e-5)
        check_close(f"{name} o", o, o_fp64, 1e-2)
        print(f"# checked {name}: o and state match the fp64 reference on B=8", flush=True)


def run(quick: bool) -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("the lightning_attn_step benchmark needs a GPU")
    backends, skipped = _backends()
    for name, reason in skipped.items():
        print(f"# skipped {name}: {reason}", flush=True)
    log_decay = _log_decay()
    scale = K ** -0.5
    _check(backends, log_decay, scale)

    rows = []
    for B in QUICK_BATCHES if quick else BATCHES:
        nbytes = lightning_step_bytes(B, T, H, K, V, DTYPE.itemsize)
        sets = [_step_inputs(B, seed=s) for s in range(rotation_count(nbytes))]
        shape = f"B{B} T{T} H{H} K{K} V{V} bf16"
        for name, step in backends.items():
            calls = [lambda x=x, step=step: step(x, log_decay, scale) for x in sets]
            fn = rotating(calls)
            row = {"op": "lightning_attn_step", "shape": shape, "backend": name, "pass": "decode"}
            row["ms_eager"] = bench_ms(fn)
            if name == "reference":
                row["ms"], row["timing"] = row["ms_eager"], "eager"
            else:
                row["ms"], row["timing"] = bench_ms(fn, graph=True), "graph"
            rows.append(add_rates(row, nbytes=nbytes))
            print(f"# {shape} {name}: {row['ms'] * 1e3:.1f} us ({row['timing']}), eager {row['ms_eager'] * 1e3:.1f} us",
                  flush=True)
        del sets
        torch.cuda.empty_cache()
    add_speedups(rows, FLA)
    return rows
