"""Block-size sweep of the HyPE attention Triton kernels on the current GPU.

    python -m benches.hype_attn_tune [--shapes 4x4096,1x16384] [--parts fwd,dkdv,dq] [--jobs 8] [--out DIR]

The kernels take (BLOCK_M, BLOCK_N, num_warps, num_stages) from tables tuned on one card
(triton_ops.hype_attention FWD_CONFIGS, DKDV_CONFIGS, DQ_CONFIGS, D = 128 here); this tool times the candidates
below on another card so the tables can be retuned. Shapes are B x T with Hq 16, Hkv 8, D 128, bf16, causal,
alpha = 500 (the op benchmark's). Parts: the forward kernel alone; the backward (preprocess + dk/dv + dq kernels)
with one kernel's config varied and the other at its table value; the dq sweep uses the table's dk/dv config.

Every candidate is first compiled in --jobs parallel processes on a small input with the same kernel
specialisation (Triton compiles on the host, one kernel at a time per process, and caches on disk), then timed
in this process; each candidate's outputs are compared with the table config's (relative error < 1e-2, block
sizes only change the summation order), and a candidate that fails to compile (e.g. too much shared memory)
or to match is reported as such. Prints one table per part and writes DIR/hype_attn_tune.json ($OUT too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import torch

HQ, HKV, D, ALPHA = 16, 8, 128, 500.0
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CANDIDATES = {
    "fwd": [(128, 128, 8, 3), (128, 128, 8, 2), (128, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
            (128, 64, 4, 4), (64, 128, 4, 3), (64, 64, 4, 3)],
    "dkdv": [(64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 4, 2), (32, 128, 4, 2), (32, 128, 8, 2),
             (128, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 2), (32, 64, 4, 3),
             (16, 128, 4, 2)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3),
           (64, 64, 4, 2), (64, 128, 4, 2), (128, 32, 4, 3), (64, 32, 4, 4)],
}


def make_inputs(B: int, T: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(torch.bfloat16)

    return {"q": randn(B, T, HQ, D), "k": randn(B, T, HKV, D), "v": randn(B, T, HKV, D), "do": randn(B, T, HQ, D)}


def run_part(part: str, config: Optional[tuple], x: dict, fwd_out: Optional[tuple] = None):
    """The part's launcher call with `config` for the part's kernel (None: the table's)."""
    from triton_ops.hype_attention.bwd import hype_attn_bwd
    from triton_ops.hype_attention.fwd import hype_attn_fwd

    if part == "fwd":
        return hype_attn_fwd(x["q"], x["k"], x["v"], ALPHA, config=config)
    o, lse = fwd_out
    kwargs = {"dkdv_config": config} if part == "dkdv" else {"dq_config": config}
    return hype_attn_bwd(x["q"], x["k"], x["v"], o, lse, x["do"], ALPHA, **kwargs)


def compile_candidates(jobs: list[tuple[str, tuple]]) -> dict:
    """Runs each (part, config) once on B1 T256 (same specialisation as the timed shapes): fills Triton's disk
    cache. Returns {(part, config): error text} for those that fail."""
    x = make_inputs(1, 256)
    fwd_out = run_part("fwd", None, x)
    errors = {}
    for part, config in jobs:
        try:
            run_part(part, config, x, fwd_out)
            torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001 - a config that does not compile is a result of the sweep
            errors[(part, config)] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return errors


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def sweep_shape(B: int, T: int, parts: list[str], compile_errors: dict) -> list[dict]:
    from benches.common import bench_ms

    x = make_inputs(B, T)
    fwd_out = run_part("fwd", None, x)
    rows = []
    for part in parts:
        reference = run_part(part, None, x, fwd_out)
        table_ms = bench_ms(lambda: run_part(part, None, x, fwd_out))
        for config in CANDIDATES[part]:
            row = {"shape": f"B{B} T{T}", "part": part, "config": list(config)}
            error = compile_errors.get((part, config))
            if error is None:
                out = run_part(part, config, x, fwd_out)
                worst = max(relative_error(a, b) for a, b in zip(out, reference))
                if worst > 1e-2:
                    error = f"mismatch: relative error {worst:.2e} against the table config"
            if error is None:
                ms = bench_ms(lambda: run_part(part, config, x, fwd_out))
                row.update(ms=ms, vs_table=table_ms / ms)
            else:
                row["error"] = error
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    config = "(" + ", ".join(str(c) for c in row["config"]) + ")"
    result = f"{row['ms']:.4f} ms  {row['vs_table']:.3f}x" if "ms" in row else row["error"]
    return f"{row['shape']:<12} {row['part']:<5} {config:<20} {result}"


def shape_list(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) <= 0 for s in shapes):
        raise argparse.ArgumentTypeError(f"must be comma-separated BxT pairs such as 4x4096, got {text!r}")
    return shapes


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=shape_list, default=[(4, 4096), (1, 16384)], help="BxT pairs")
    parser.add_argument("--parts", default="fwd,dkdv,dq", help="comma-separated subset of fwd, dkdv, dq")
    parser.add_argument("--jobs", type=int, default=8, help="processes that compile the candidates")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory of hype_attn_tune.json")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if not parts or any(p not in CANDIDATES for p in parts):
        parser.error(f"--parts must be a comma-separated subset of {', '.join(CANDIDATES)}, got {args.parts!r}")
    if args.jobs <= 0:
        parser.error(f"--jobs must be > 0, got {args.jobs}")
    if not torch.cuda.is_available():
        print("benches.hype_attn_tune needs a CUDA device", file=sys.stderr)
        return 2
    from benches.common import device_description

    jobs = [(part, config) for part in parts for config in CANDIDATES[part]]
    compile_errors: dict = {}
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        for errors in pool.map(compile_candidates, [jobs[i::args.jobs] for i in range(args.jobs)]):
            compile_errors.update(errors)
    description = device_description()
    print(f"# HyPE attention kernel configs, Hq {HQ} Hkv {HKV} D {D} bf16 causal alpha {ALPHA:g} - {description}")
    rows = [row for B, T in args.shapes for row in sweep_shape(B, T, parts, compile_errors)]
    payload = {"device": description, "rows": rows}
    targets = [args.out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for target in dict.fromkeys(targets):
        target.mkdir(parents=True, exist_ok=True)
        (target / "hype_attn_tune.json").write_text(json.dumps(payload, indent=2) + "\n")
    print("# best per part (geometric mean of the speed-up over the shapes):")
    for part in parts:
        scores = {}
        for config in CANDIDATES[part]:
            ratios = [r["vs_table"] for r in rows if r["part"] == part and r["config"] == list(config) and "ms" in r]
            if len(ratios) == len(args.shapes):
                scores[config] = float(torch.tensor(ratios).log().mean().exp())
        if scores:
            best = max(scores, key=scores.get)
            print(f"{part}: {best} {scores[best]:.3f}x over the table config")
    return 0


if __name__ == "__main__":
    sys.exit(main())
