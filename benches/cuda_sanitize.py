"""Runs every CUDA kernel of hypenet._C at odd shapes, for compute-sanitizer:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python -m benches.cuda_sanitize [--quick]

(without the caching allocator every tensor is its own allocation, so an overrun past a tensor is caught).
Exits non-zero when an op of the build has no cases here or a case raises; the sanitizer reports the rest.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch


def lightning_attn_step_cases(quick: bool) -> int:
    """Pool slots in scrambled order, a slot past the pool and a negative one, strided q/k/v, T > 2 (so the
    double-buffered shared memory of the output reduction is reused), every dtype and head dim built."""
    runs = 0
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    for dtype in dtypes:
        for D in (64, 128):
            B, T, H, N = 3, 3, 5, 7
            q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
            log_decay = -torch.rand(H, device="cuda")
            state = torch.randn(N, H, D, D, device="cuda")
            for slots, index_dtype in (([6, 0, 3], torch.int64), ([7, -1, 2], torch.int32)):
                indices = torch.tensor(slots, device="cuda", dtype=index_dtype)
                o = torch.ops.hypenet_cuda.lightning_attn_step(q, k, v, log_decay, state, indices, 0.125)
                torch.cuda.synchronize()
                valid = torch.tensor([0 <= s < N for s in slots], device="cuda")
                if not (torch.isfinite(o[valid]).all() and torch.isnan(o[~valid]).all()):
                    raise AssertionError(f"lightning_attn_step {dtype} D={D} slots={slots}: wrong NaN pattern")
                runs += 1
    return runs


def _require_finite(what: str, *tensors: torch.Tensor) -> None:
    """Waits for the launch, then fails when an output holds a non-finite value."""
    torch.cuda.synchronize()
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise AssertionError(f"{what}: non-finite output or final state")


def lightning_chunk_scan_cases(quick: bool) -> int:
    """Both time directions, both head dims (one each with --quick), T = 130 (a last chunk of 2 rows, rows past the
    end zero-filled), one segment per sequence from per-sequence start states, and three 64-token segments from
    per-segment start states given as a transposed (strided) view, with a final state each time."""
    runs = 0
    B, T, H = 2, 130, 3
    for D in (128,) if quick else (64, 128):
        for reverse in (False,) if quick else (False, True):
            a, b, c = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            log_decay = -torch.rand(H, device="cuda")
            for seg_len, per_segment in ((256, False), (64, True)):
                num_segs = -(-T // seg_len)
                rows = B * num_segs if per_segment else B
                start = torch.randn(rows, H, D, D, device="cuda").transpose(-1, -2)
                final = torch.empty(B, H, D, D, device="cuda")
                out = torch.empty_like(c)
                torch.ops.hypenet_cuda.lightning_chunk_scan(a, b, c, log_decay, start, final, out, seg_len, num_segs,
                                                            0.125, 1.0, 0.125, reverse, per_segment)
                _require_finite(f"lightning_chunk_scan D={D} reverse={reverse} seg_len={seg_len}", out, final)
                runs += 1
    return runs


def lightning_chunk_scan_packed_cases(quick: bool) -> int:
    """Both time directions and head dims (one each with --quick) over sequences of 130, 1, 64, 200 and 0 tokens
    (a partial last chunk, a one-token and an exactly-one-chunk sequence, an empty one at the batch's end whose
    chunk has no rows), cut into 128-token ranges so that ranges open inside sequences and read range states
    (a transposed view), with initial and final states."""
    from triton_ops.lightning.chunk import _plan_packed

    runs = 0
    lengths = [130, 1, 64, 200, 0]
    T, H, N = sum(lengths), 3, len(lengths)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    for D in (128,) if quick else (64, 128):
        plan = _plan_packed(T, cu_seqlens, H, D, segment_len=128)
        for reverse in (False,) if quick else (False, True):
            a, b, c = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            log_decay = -torch.rand(H, device="cuda")
            range_states = torch.randn(plan.ranges + 1, H, D, D, device="cuda").transpose(-1, -2)
            initial = torch.randn(N, H, D, D, device="cuda")
            final = torch.empty(N, H, D, D, device="cuda")
            out = torch.empty_like(c)
            torch.ops.hypenet_cuda.lightning_chunk_scan_packed(a, b, c, log_decay, range_states, initial, final, out,
                                                               plan.chunk_table, plan.range_table, 0.125, 1.0, 0.125,
                                                               reverse)
            _require_finite(f"lightning_chunk_scan_packed D={D} reverse={reverse}", out, final)
            runs += 1
    return runs


CASES: dict[str, Callable[[bool], int]] = {
    "lightning_attn_step": lightning_attn_step_cases,
    "lightning_chunk_scan": lightning_chunk_scan_cases,
    "lightning_chunk_scan_packed": lightning_chunk_scan_packed_cases,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one dtype (for the slower racecheck)")
    args = parser.parse_args()
    from hypenet.ops.cuda_ext import build_info, cuda_ext_error

    if cuda_ext_error() is not None:
        print(f"cuda_sanitize: no extension to check: {cuda_ext_error()}")
        return 1
    built = build_info().get("cuda_ops", [])
    missing = [op for op in built if op not in CASES]
    for op in built:
        if op in CASES:
            print(f"cuda_sanitize: {op}: {CASES[op](args.quick)} launches", flush=True)
    if missing:
        print(f"cuda_sanitize: no cases for built ops {missing}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
