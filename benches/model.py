"""HypeNet-2B vs Qwen3-1.7B shapes: prefill time and time per output token at long contexts.

    python -m benches.model [--contexts 32768,65536,...] [--layers N] [--decode-steps 16]
                            [--prefill-chunk 65536] [--models hypenet,qwen3] [--no-graph] [--out DIR]
                            [--device cuda|cpu]

Batch 1, bf16, random weights, on the current CUDA device (--device cpu: a smoke run of the script, wall-clock
timings, no CUDA graph). For every context P:
- prefill: the time to run P random tokens into an empty cache. HypeNet prefills in chunks of --prefill-chunk
  tokens through its HypeNetCache (0: one call); Qwen3 is the transformers model with SDPA attention and a
  DynamicCache, prefilled in one call (its chunked path would build [chunk, P] masks);
- decode: the mean time per output token over --decode-steps greedy steps after the prefill, eager for both;
  HypeNet also replayed from a CUDA graph of one decode step (Qwen3's DynamicCache grows by concatenation, so it
  cannot be captured, and that concatenation copies its whole cache every step: its eager time includes it);
- decode floor: bytes a step must read (weights, attention K/V at P, Lightning states read and written) over
  the measured copy bandwidth of the card.
An out-of-memory failure is recorded as "OOM" and larger contexts of that model are skipped. Results go to
DIR/model.json and DIR/model.png (DIR defaults to benches/results, and $OUT gets a copy); every measurement
rewrites the JSON, so an interrupted run keeps what it measured. Timings are reported, never asserted.
--layers N keeps N layers of each model (HypeNet: about one in four attention, evenly spaced) for quick runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from benches.common import device_description, measured_peak
from halo.plots import pyplot
from hypenet.cache import HypeNetCache
from hypenet.config import HypeNetConfig, mixer_layout
from hypenet.modeling import CACHE_FIELD, HypeNetForCausalLM

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_CONTEXTS = (32768, 65536, 131072, 262144, 524288, 1048576)
DTYPE = torch.bfloat16
WARMUP_CONTEXT = 2048


def hypenet_config(layers: int) -> HypeNetConfig:
    """HypeNet-2B, or its first `layers`-layer variant with about a quarter attention layers evenly spaced."""
    if layers == 28:
        return HypeNetConfig.hypenet_2b()
    n_attn = max(1, round(layers / 4))
    attn = sorted({int((j + 0.5) * layers / n_attn) for j in range(n_attn)})
    return HypeNetConfig.hypenet_2b(num_hidden_layers=layers, mixer_types=mixer_layout(layers, attn))


def qwen3_config(layers: int, **overrides):
    """Qwen3-1.7B's shape (the HypeNet-2B teacher) with `layers` layers and SDPA attention; `overrides` replace
    any field."""
    from transformers import Qwen3Config

    fields = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
                  max_position_embeddings=1_048_576 * 2, tie_word_embeddings=True)
    return Qwen3Config(**{**fields, **overrides})


def build(name: str, layers: int, device: torch.device) -> torch.nn.Module:
    """A random-weight model in bf16 on `device`, in eval mode (Qwen3 with SDPA attention)."""
    with torch.device(device):
        if name == "hypenet":
            model = HypeNetForCausalLM._from_config(hypenet_config(layers), dtype=DTYPE)
        else:
            from transformers import Qwen3ForCausalLM

            model = Qwen3ForCausalLM._from_config(qwen3_config(layers), dtype=DTYPE, attn_implementation="sdpa")
    return model.eval()


def decode_floor_bytes(model: torch.nn.Module, name: str, context: int) -> int:
    """Bytes one decode step must move at `context` cached tokens: every weight once (the tied embedding is read
    as lm_head), the attention K and V, and each Lightning state read and written in fp32."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_token = 2 * config.num_key_value_heads * config.head_dim * torch.finfo(DTYPE).bits // 8
    if name == "hypenet":
        n_attn = len(config.attn_layer_indices)
        n_lightning = config.num_hidden_layers - n_attn
        state = config.lightning_nh * config.lightning_head_dim ** 2 * 4 * 2
        return weights + n_attn * kv_token * context + n_lightning * state
    return weights + config.num_hidden_layers * kv_token * context


def elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of fn: between CUDA events on a GPU, wall clock on the CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


class Run:
    """Prefill then greedy decode of one model at one context, keeping the state between phases."""

    def __init__(self, model: torch.nn.Module, name: str, context: int, steps: int, chunk: int):
        self.model, self.name, self.context, self.steps, self.chunk = model, name, context, steps, chunk
        self.device = model.device
        self.cache = None
        self.next_ids: Optional[torch.Tensor] = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: self.cache})
        self.cache = getattr(out, CACHE_FIELD)
        return out.logits

    def prefill(self) -> None:
        ids = torch.randint(0, self.model.config.vocab_size, (1, self.context), device=self.device)
        if self.name == "hypenet":
            # Room for the decode steps: eager warm-up and timed steps, graph warm-up, capture and replays.
            self.cache = HypeNetCache(self.model.config, 1, self.context + 3 * self.steps + 8, dtype=DTYPE,
                                      device=self.device)
            chunk = self.chunk or self.context
        else:
            chunk = self.context
        for start in range(0, self.context, chunk):
            logits = self.forward(ids[:, start:start + chunk])
        self.next_ids = logits[:, -1:].argmax(-1)

    def decode_steps(self, n: int) -> None:
        for _ in range(n):
            self.next_ids = self.forward(self.next_ids)[:, -1:].argmax(-1)

    def graph_decode_ms(self) -> float:
        """Per-token time of CUDA-graph replays of one decode step (each replay is a real step: the cache
        lengths advance on the device)."""
        static_ids = self.next_ids.clone()

        def step():
            return self.model(static_ids, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: self.cache}).logits

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()

        def replays():
            for _ in range(self.steps):
                graph.replay()

        return elapsed_ms(replays, self.device) / self.steps


def measure(model: torch.nn.Module, name: str, context: int, args) -> dict:
    row = {"model": name, "context": context, "status": "ok"}
    on_gpu = model.device.type == "cuda"
    floor_tbps = measured_peak("tbps")
    if floor_tbps:
        row["decode_floor_ms"] = decode_floor_bytes(model, name, context) / (floor_tbps * 1e12) * 1e3
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    run = Run(model, name, context, args.decode_steps, args.prefill_chunk)
    stage = "prefill"
    try:
        with torch.no_grad():
            row["prefill_ms"] = elapsed_ms(run.prefill, model.device)
            row["prefill_tok_per_s"] = context / (row["prefill_ms"] * 1e-3)
            stage = "decode"
            run.decode_steps(2)
            row["decode_ms"] = elapsed_ms(lambda: run.decode_steps(args.decode_steps), model.device) \
                / args.decode_steps
            if name == "hypenet" and args.graph and on_gpu:
                stage = "decode (CUDA graph)"
                try:
                    row["decode_graph_ms"] = run.graph_decode_ms()
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as err:  # noqa: BLE001 - a capture failure is a result to report, not a crash
                    row["graph_error"] = f"{type(err).__name__}: {err}"[:300]
    except torch.cuda.OutOfMemoryError:
        row["status"] = f"OOM during {stage}"
    except Exception as err:  # noqa: BLE001 - one failed measurement must not lose the rest of the sweep
        row["status"] = f"error during {stage}: {type(err).__name__}: {err}"[:300]
    if on_gpu:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del run
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return row


def ratios(rows: list[dict]) -> list[dict]:
    """Per context: Qwen3 time / HypeNet time for prefill and decode (eager vs eager, and graph vs eager)."""
    by = {(r["model"], r["context"]): r for r in rows}
    out = []
    for context in sorted({r["context"] for r in rows}):
        h, q = by.get(("hypenet", context), {}), by.get(("qwen3", context), {})
        entry = {"context": context}
        for key, num, den in (("prefill_speedup", "prefill_ms", "prefill_ms"),
                              ("decode_speedup", "decode_ms", "decode_ms"),
                              ("decode_speedup_graph", "decode_ms", "decode_graph_ms")):
            if q.get(num) and h.get(den):
                entry[key] = q[num] / h[den]
        out.append(entry)
    return out


COLUMNS = [("model", "{}"), ("context", "{}"), ("prefill_ms", "{:.1f}"), ("prefill_tok_per_s", "{:.0f}"),
           ("decode_ms", "{:.2f}"), ("decode_graph_ms", "{:.2f}"), ("decode_floor_ms", "{:.2f}"),
           ("peak_gib", "{:.1f}"), ("status", "{}")]


def format_rows(rows: list[dict], columns: list[tuple[str, str]] = COLUMNS) -> str:
    """Aligned text table of `rows`, one (key, format) per column, empty cells where a row lacks the key; the
    header line alone for no rows (the benchmarks print it first, then each row as it is measured)."""
    lines = [[key for key, _ in columns]]
    for r in rows:
        lines.append([fmt.format(r[key]) if r.get(key) is not None else "" for key, fmt in columns])
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def plot(rows: list[dict], path: Path, title: str) -> str:
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed: no plot"
    fig, (ax_prefill, ax_decode) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"hypenet": "tab:blue", "qwen3": "tab:red"}
    for name, color in styles.items():
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["context"])
        for ax, key, label, style in ((ax_prefill, "prefill_ms", name, "-o"), (ax_decode, "decode_ms", name, "-o"),
                                      (ax_decode, "decode_graph_ms", f"{name} (CUDA graph)", "--s"),
                                      (ax_decode, "decode_floor_ms", f"{name} floor", ":")):
            points = [(r["context"], r[key]) for r in mine if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), style, color=color, label=label)
        for r in mine:
            if r["status"].startswith("OOM"):
                for ax in (ax_prefill, ax_decode):
                    ax.axvline(r["context"], color=color, alpha=0.3)
                    ax.annotate(f"{name} OOM", (r["context"], 0.98), xycoords=("data", "axes fraction"),
                                rotation=90, va="top", color=color, fontsize=8)
                break
    for ax, ylabel in ((ax_prefill, "prefill time (ms)"), (ax_decode, "time per output token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return f"wrote {path}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)),
                        help="comma-separated context lengths")
    parser.add_argument("--layers", type=int, default=28, help="layers of each model (28 = the real shapes)")
    parser.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per context")
    parser.add_argument("--prefill-chunk", type=int, default=65536, help="HypeNet prefill chunk (0: one call)")
    parser.add_argument("--models", default="hypenet,qwen3", help="comma-separated subset of hypenet,qwen3")
    parser.add_argument("--no-graph", dest="graph", action="store_false", help="skip the CUDA-graph decode")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory of model.json / model.png")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run)")
    args = parser.parse_args(argv)
    target_device = torch.device(args.device)
    if target_device.type == "cuda" and not torch.cuda.is_available():
        print("benches.model needs a CUDA device (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    contexts = sorted(int(c) for c in args.contexts.split(","))
    names = [n for n in ("hypenet", "qwen3") if n in args.models.split(",")]
    device = device_description()
    title = f"HypeNet-2B vs Qwen3-1.7B shapes ({args.layers} layers), batch 1, bf16 - {device}"
    print(f"# {title}", flush=True)
    print(format_rows([]), flush=True)

    targets = [args.out]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]))
    rows: list[dict] = []

    def save() -> None:
        payload = {"device": device, "layers": args.layers, "decode_steps": args.decode_steps,
                   "hypenet_prefill_chunk": args.prefill_chunk, "dtype": str(DTYPE), "batch": 1,
                   "rows": rows, "ratios": ratios(rows)}
        for target in dict.fromkeys(targets):
            target.mkdir(parents=True, exist_ok=True)
            (target / "model.json").write_text(json.dumps(payload, indent=2) + "\n")
            plot(rows, target / "model.png", title)

    for name in names:
        model = build(name, args.layers, target_device)
        # Compiles kernels and sets up libraries; HypeNet's warm-up spans two prefill chunks so that the kernels of
        # a chunk attending to earlier keys are compiled before the first timed context too.
        warm_context = min(WARMUP_CONTEXT, contexts[0])
        if name == "hypenet" and 0 < args.prefill_chunk < max(contexts):
            warm_context += args.prefill_chunk
        warm = measure(model, name, warm_context, args)
        if warm["status"] != "ok":
            print(f"# {name} warm-up failed: {warm['status']}", flush=True)
        failed = None
        for context in contexts:
            if failed is not None:
                rows.append({"model": name, "context": context, "status": f"OOM (skipped: OOM at {failed})"})
                continue
            row = measure(model, name, context, args)
            rows.append(row)
            if row["status"].startswith("OOM"):
                failed = context
            print(format_rows([row]).splitlines()[-1], flush=True)
            save()
        del model
        gc.collect()
        if target_device.type == "cuda":
            torch.cuda.empty_cache()

    save()
    print(format_rows(rows))
    for entry in ratios(rows):
        print("  ".join(f"{k}={v:.2f}x" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
    for target in dict.fromkeys(targets):
        print("# " + plot(rows, target / "model.png", title))
        print(f"# wrote {target / 'model.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
