"""Shared benchmark helpers: timing, correctness gates, FLOP / byte formulas, the device string, table printing and
plotting.

Conventions (benches/run.py prints and saves what the op modules return):
- a row is a dict with "op", "shape", "backend", "pass" ("fwd" | "fwd+bwd" | "decode"), "ms" (median) and
  optionally "kernel_ms" (GPU kernel time alone), "host_ms" (host time to issue one call), "tflops", "tbps",
  "pct_floor", "speedup", "anchor", "timing" and free-form notes;
- times are medians of `triton.testing.do_bench` (eager) or `do_bench_cudagraph` (graph replays, for
  kernels so short that launch gaps would dominate); inputs larger than L2 rotate so that timings read HBM;
- every module checks its backends against the reference on one shape before timing (`check_close` raises).
"""

from __future__ import annotations

import datetime
import itertools
import platform
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from halo.plots import pyplot

# Measured ceilings of the cards the benchmarks run on (device-to-device copy counting read + write bytes;
# 8192^3 bf16 matmul). Datasheet numbers are higher and unreachable, so floors use these.
MEASURED_PEAKS = {
    "H100": {"tbps": 3.0, "bf16_tflops": 773.0},
    "H200": {"tbps": 4.3, "bf16_tflops": 788.0},
}


def device_description() -> str:
    """'NVIDIA H100 80GB HBM3 (132 SMs), torch 2.11.0+cu130, triton 3.6.0, CUDA 13.0, 2026-11-27'."""
    parts = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        parts.append(f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)")
    else:
        parts.append(f"CPU {platform.processor() or platform.machine()}")
    parts.append(f"torch {torch.__version__}")
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    parts.append(datetime.date.today().isoformat())
    return ", ".join(parts)


def measured_peak(kind: str) -> Optional[float]:
    """The measured ceiling ("tbps" or "bf16_tflops") of the current GPU, or None for an unknown card."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for card, peaks in MEASURED_PEAKS.items():
        if card in name:
            return peaks[kind]
    return None


def l2_bytes() -> int:
    """L2 size of the current GPU (50 MB on an H100 when the property is unavailable)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def rotation_count(bytes_per_set: int, min_sets: int = 1) -> int:
    """How many input sets to cycle through so that consecutive calls miss L2 (all sets >= 3x L2)."""
    return max(min_sets, -(-3 * l2_bytes() // max(1, bytes_per_set)))


def rotating(calls: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs the next of `calls` each time (inputs rotate; captured graphs rotate too)."""
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def bench_ms(fn: Callable[[], object], *, graph: bool = False, rep_ms: Optional[int] = None) -> float:
    """Median milliseconds of one call: eager `do_bench` (warm-up, L2 flushed between calls, events), or replays
    of a CUDA graph holding about rep_ms worth of calls back to back (no launch gaps: for microsecond kernels;
    `fn` must be capturable: no host syncs)."""
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms or 20, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms or 100, return_mode="median"))


def kernel_ms(fn: Callable[[], object], iters: int = 10) -> float:
    """GPU time of one call summed over its kernels (torch.profiler), without the host gaps between launches: for
    ops that launch several kernels, whose do_bench time a slow host can dominate. L2 is not flushed."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return sum(event.device_time_total for event in prof.key_averages()) / iters / 1000.0


def host_ms(fn: Callable[[], object], iters: int = 20) -> float:
    """Host time to issue one call: `iters` calls back to back without waiting for the GPU, timed on the host (few
    enough that the launch queue never fills and blocks). Next to kernel_ms it shows whether a call is host-bound."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    seconds = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 1000.0 * seconds / iters


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64."""
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def check_close(name: str, out: torch.Tensor, ref: torch.Tensor, rel_tol: float) -> float:
    """Raise unless `out` has no NaN and ||out - ref|| / ||ref|| <= rel_tol; returns the relative error."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if torch.isnan(out).any():
        raise AssertionError(f"{name}: {int(torch.isnan(out).sum())} NaN elements")
    err = relative_error(out, ref)
    if not err <= rel_tol:
        raise AssertionError(f"{name}: relative error {err:.2e} > {rel_tol:.0e}")
    return err


# ------------------------------------------------------------------------------------------- FLOP / byte formulas

def lightning_step_bytes(B: int, T: int, H: int, K: int, V: int, elem_bytes: int) -> int:
    """Fewest bytes of a decode step: the fp32 [K, V] state of each (row, head) read and written once, plus q, k
    (B*T*H*K each), v and o (B*T*H*V each) in the input dtype."""
    return B * H * K * V * 4 * 2 + B * T * H * (2 * K + 2 * V) * elem_bytes


def lightning_chunk_bytes(B: int, T: int, H: int, K: int, V: int, elem_bytes: int, backward: bool) -> int:
    """Fewest bytes of the training op: fwd reads q, k, v and writes o; fwd+bwd adds reading q, k, v, do and
    writing dq, dk, dv (states stay on chip)."""
    fwd = B * T * H * (2 * K + 2 * V) * elem_bytes
    bwd = B * T * H * (4 * K + 3 * V) * elem_bytes  # q, k, v, do in; dq, dk, dv out
    return fwd + (bwd if backward else 0)


def causal_attention_flops(B: int, Hq: int, T: int, D: int, backward: bool) -> float:
    """Causal softmax attention FLOPs counting half the T x T square: fwd 2*B*Hq*T^2*D, fwd+bwd 3.5x that."""
    fwd = 2.0 * B * Hq * T * T * D
    return fwd * (3.5 if backward else 1.0)


def add_rates(row: dict, *, flops: Optional[float] = None, nbytes: Optional[int] = None) -> dict:
    """Fill "tflops" / "tbps" and "pct_floor" (the floor time from the measured ceilings, over the measured time)."""
    seconds = row["ms"] * 1e-3
    floors = []
    if flops is not None:
        row["tflops"] = flops / seconds / 1e12
        peak = measured_peak("bf16_tflops")
        if peak:
            floors.append(flops / (peak * 1e12))
    if nbytes is not None:
        row["tbps"] = nbytes / seconds / 1e12
        peak = measured_peak("tbps")
        if peak:
            floors.append(nbytes / (peak * 1e12))
    if floors:
        row["pct_floor"] = 100.0 * max(floors) / seconds
    return row


def add_speedups(rows: Iterable[dict], anchor: str) -> None:
    """Set "speedup" = anchor ms / ms for every row whose (shape, pass) has a row of backend `anchor`."""
    rows = list(rows)
    anchors = {(r["shape"], r["pass"]): r["ms"] for r in rows if r["backend"] == anchor}
    for r in rows:
        base = anchors.get((r["shape"], r["pass"]))
        if base is not None:
            r["speedup"] = base / r["ms"]
            r["anchor"] = anchor


# ------------------------------------------------------------------------------------------------------ table

TABLE_COLUMNS = [("op", "{}"), ("shape", "{}"), ("pass", "{}"), ("backend", "{}"), ("ms", "{:.4f}"),
                 ("kernel_ms", "{:.4f}"), ("host_ms", "{:.4f}"), ("tflops", "{:.1f}"), ("tbps", "{:.2f}"),
                 ("pct_floor", "{:.0f}%"), ("speedup", "{:.2f}x"), ("timing", "{}")]


def format_table(rows: Sequence[dict]) -> str:
    """Aligned text table of the rows (columns without any value are left out)."""
    columns = [(key, fmt) for key, fmt in TABLE_COLUMNS if any(r.get(key) is not None for r in rows)]
    cells = [[key for key, _ in columns]]
    for r in rows:
        cells.append([fmt.format(r[key]) if r.get(key) is not None else "" for key, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- plots

def plot_rows(rows: Sequence[dict], path: Path, title: str) -> str:
    """PNG of a benchmark's rows: one panel per pass, one group of horizontal bars per shape, one bar per backend
    (its do_bench ms on a log axis, labelled with the ms and the speed-up over the anchor). Returns what it did."""
    plt = pyplot()
    if plt is None:
        return f"matplotlib is not installed: no {path.name}"
    passes = list(dict.fromkeys(r["pass"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    shapes = {p: list(dict.fromkeys(r["shape"] for r in rows if r["pass"] == p)) for p in passes}
    bar = 0.8 / len(backends)
    tallest = max(len(s) for s in shapes.values())
    fig, axes = plt.subplots(1, len(passes), figsize=(7.5 * len(passes), 1.5 + tallest * len(backends) * 0.32),
                             squeeze=False)
    for ax, pass_ in zip(axes[0], passes):
        by_key = {(r["shape"], r["backend"]): r for r in rows if r["pass"] == pass_}
        for i, backend in enumerate(backends):
            points = [(j, by_key[shape, backend]) for j, shape in enumerate(shapes[pass_])
                      if (shape, backend) in by_key]
            if not points:
                continue
            ys = [j + (i - (len(backends) - 1) / 2) * bar for j, _ in points]
            ax.barh(ys, [r["ms"] for _, r in points], bar, color=f"C{i}", label=backend)
            for y, (_, r) in zip(ys, points):
                speedup = f", {r['speedup']:.2f}x" if r.get("speedup") is not None else ""
                ax.annotate(f" {r['ms']:.3g} ms{speedup}", (r["ms"], y), va="center", fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}" if f"{x:.0e}"[0] in "25" else ""))
        ax.set_yticks(range(len(shapes[pass_])), shapes[pass_], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms per call (log scale; speed-up over the anchor)")
        ax.set_title(pass_)
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.margins(x=0.25)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(backends), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"
