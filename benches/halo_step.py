"""HALO stage-2 (distillation) training step: throughput and MFU, HypeNet-2B student with a frozen Qwen3-1.7B teacher.

    python -m benches.halo_step [--batches 4,8,16] [--ctx 512] [--steps 10] [--warmup 3] [--layers N]
                                [--accumulation N] [--checkpointing] [--compile] [--breakdown] [--profile]
                                [--loss-chunk-size 1024] [--peak-tflops X]
                                [--out DIR] [--device cuda|cpu] [--shapes real|tiny]

Random weights, on the current CUDA device (--device cpu: a smoke run of the script with tiny widths, wall-clock
timings, no MFU). The models are built as HALO builds them: the teacher is a transformers Qwen3ForCausalLM
(Qwen3-1.7B's shape, bf16 weights, eval mode, frozen, SDPA attention), the student comes from it through
`hypenet.convert_qwen3` (float32 master weights) with the layout of `benches.model.hypenet_config` (HypeNet-2B's;
--layers N keeps N layers of both, about a quarter attention in the student). For every micro batch size of
--batches, one HALO stage-2 optimizer step is `halo.train.Trainer`'s step with `halo.distill.DistillationLoss`:
teacher forward under no_grad, student forward under bf16 autocast, the fused chunked forward KL (both lm_heads,
bf16 matmuls with float32 logits), backward, gradient clipping at 1.0, AdamW (0.9, 0.95). --accumulation N runs N
micro batches per optimizer step (the global batch is N times the micro batch; the paper's stage 2 uses 96 rows,
so 6 micro batches of 16 on one GPU), which spreads the clipping and the AdamW update over N micro batches.
--compile puts every decoder layer of both models through torch.compile, as `halo distill` does on CUDA by default
(distill.compile); without it the step runs eagerly. --warmup steps (compilation, Triton autotuning, AdamW
state), then --steps timed back to back between CUDA events: ms per step, tokens/s (batch * accumulation * ctx
per step), the model FLOPs of a step (`step_flops`: what the models compute, not recomputation) and MFU = model FLOP/s over the bf16 dense datasheet
peak of the card (989 TFLOP/s for H100 SXM and H200; --peak-tflops for other cards). --breakdown also times the
parts of a step alone: teacher forward, student forward + backward from a fixed gradient on its final hidden
states, the fused KL forward + backward from stored hidden states (each per micro batch), and clipping + the AdamW
step (once per step); rest_ms is what the step took beyond accumulation * the first three + the fourth.
--profile writes a torch.profiler table of one step per batch size (DIR/halo_step_profile_b<batch>.txt).
An out-of-memory failure is recorded as "OOM" and larger batches are skipped. Results go to DIR/halo_step.json
(DIR/halo_step_checkpointing.json with --checkpointing; DIR defaults to benches/results, and $OUT gets a copy);
every measurement rewrites the JSON. Timings are reported, never asserted.

Several GPUs: `torchrun --standalone --nproc_per_node G -m benches.halo_step ...` runs the same step data-parallel
as `halo distill` does under torchrun (every rank holds the models and --batches rows per step, the gradients are
averaged by the Trainer's all-reduce), so a row's global batch is G * accumulation times its micro batch. tokens/s counts every
rank's tokens; MFU is per GPU. Rank 0 prints and writes DIR/halo_step_<G>gpu[_checkpointing].json. A failure on one rank ends the
whole run (torchrun stops the other ranks) instead of being recorded as a row, since the other ranks would wait
for it in the all-reduce.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from benches.common import causal_attention_flops, device_description, measured_peak
from benches.model import RESULTS_DIR, elapsed_ms, format_rows, hypenet_config, qwen3_config
from halo.config import HaloConfig
from halo.data import PackedBatches
from halo.distill import DistillationLoss
from halo.evals import final_hidden, output_weight
from halo.losses import fused_linear_kl
from halo.train import (DistInfo, Trainer, autocast_context, autocast_dtype, compile_decoder_layers,
                        enable_activation_checkpointing, init_distributed, resolve_device)
from hypenet.convert import convert_qwen3

# Qwen3 fields of the smoke-run models (the student takes its widths from the teacher, as HALO's does).
TINY_WIDTHS = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16)
# bf16 dense tensor-core peaks from NVIDIA's datasheets, matched in order against the device name.
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                         ("H200", 989.0))
COLUMNS = [("batch", "{}"), ("accumulation", "{}"), ("ctx", "{}"), ("ms_per_step", "{:.1f}"),
           ("tokens_per_s", "{:.0f}"),
           ("model_tflops_per_step", "{:.2f}"), ("mfu", "{:.1%}"), ("peak_gib", "{:.1f}"), ("status", "{}")]
BREAKDOWN_COLUMNS = [("batch", "{}"), ("ms_per_step", "{:.1f}"), ("teacher_fwd_ms", "{:.1f}"),
                     ("student_fwd_bwd_ms", "{:.1f}"), ("kl_fwd_bwd_ms", "{:.1f}"), ("optimizer_ms", "{:.1f}"),
                     ("rest_ms", "{:.1f}")]


def build_models(layers: int, shapes: str, device: torch.device, amp_dtype: Optional[torch.dtype]):
    """(student, teacher) with random weights on `device`: the teacher frozen in eval mode, in bf16 when
    autocasting to bf16 and float32 otherwise (as halo.runtime.Runtime.teacher loads it); the student converted
    from it as halo.distill.build_student does, float32, in training mode."""
    from transformers import Qwen3ForCausalLM

    overrides = TINY_WIDTHS if shapes == "tiny" else {}
    teacher_dtype = torch.bfloat16 if amp_dtype == torch.bfloat16 else torch.float32
    with torch.device(device):
        teacher = Qwen3ForCausalLM._from_config(qwen3_config(layers, **overrides), dtype=teacher_dtype,
                                                attn_implementation="sdpa")
    teacher.eval().requires_grad_(False)
    student = convert_qwen3(teacher, hypenet_config(layers).mixer_types, dtype=torch.float32)
    return student.train(), teacher


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights of every nn.Linear of `model`, lm_head included (also when tied to the embedding, which itself is a
    lookup and is not counted)."""
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def forward_flops_per_token(model: torch.nn.Module, ctx: int) -> float:
    """Forward FLOPs per token of `model` (a HypeNetForCausalLM or a Qwen3ForCausalLM) on rows of `ctx` tokens.

    - matmuls: 2 * matmul_parameters(model) (a multiply and an add per weight), lm_head included: the fused KL
      computes both models' logits, so their lm_head matmuls belong to the step (bf16 operands under autocast,
      float32 output);
    - softmax attention, per attention layer: QK^T and PV over the ctx/2 keys a causal query sees on average,
      2 * 2 * (ctx / 2) * heads * head_dim (`benches.common.causal_attention_flops` per token);
    - Lightning attention, per Lightning layer: the recurrence in state form, S_t = gamma S_{t-1} + k_t^T v_t and
      o_t = q_t S_t, 2 * K * V FLOPs each, so 4 * K * V per head (K = V = lightning_head_dim). An approximation:
      the chunked kernels compute the intra-chunk part as masked attention instead, and the decay and the norms
      are not counted.
    Normalisations, activations, RoPE and the gates' elementwise products are not counted.
    """
    config = model.config
    mixers = getattr(config, "mixer_types", None) or ["attn"] * config.num_hidden_layers
    attention = causal_attention_flops(1, config.num_attention_heads, ctx, config.head_dim, backward=False) / ctx
    lightning = 4 * config.lightning_nh * config.lightning_head_dim ** 2 if "lightning-attn" in mixers else 0
    return (2 * matmul_parameters(model) + mixers.count("attn") * attention
            + mixers.count("lightning-attn") * lightning)


def step_flops(student: torch.nn.Module, teacher: torch.nn.Module, batch: int, ctx: int) -> float:
    """Model FLOPs of one stage-2 step on `batch` rows of `ctx` tokens: the student trains (forward + backward =
    3x its forward: the backward computes gradients for both the inputs and the weights of every matmul) and the
    teacher runs forward only (1x). Recomputation under activation checkpointing is not model work and is not
    counted."""
    per_token = 3 * forward_flops_per_token(student, ctx) + forward_flops_per_token(teacher, ctx)
    return batch * ctx * per_token


def datasheet_peak_tflops(device_name: str) -> Optional[float]:
    """The bf16 dense datasheet peak of a card from its name, or None for a card not in DATASHEET_BF16_TFLOPS."""
    for card, tflops in DATASHEET_BF16_TFLOPS:
        if card in device_name:
            return tflops
    return None


def distill_trainer(student, teacher, batch: int, args, device: torch.device, amp_dtype: Optional[torch.dtype],
                    dist: DistInfo) -> Trainer:
    """HALO's stage-2 Trainer (the paper's distill settings, `batch` rows per step and rank) over random token
    rows."""
    global_batch = batch * args.accumulation * dist.world_size
    cfg = dataclasses.replace(HaloConfig().distill, seq_len=args.ctx, global_batch=global_batch, micro_batch=batch,
                              gradient_checkpointing=args.checkpointing, compile=args.compile)
    rows = torch.randint(0, teacher.config.vocab_size, (global_batch, args.ctx))
    loss_fn = DistillationLoss(teacher, student, args.loss_chunk_size)
    return Trainer(name="distill", module=student, loss_fn=loss_fn,
                   batches=PackedBatches(rows, global_batch, seed=0), cfg=cfg, out_dir=args.out, dist=dist,
                   device=device, amp_dtype=amp_dtype, progress=False)


def mean_ms(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Mean milliseconds of `calls` back-to-back calls of fn, timed together."""
    def run() -> None:
        for _ in range(calls):
            fn()

    return elapsed_ms(run, device) / calls


def breakdown_ms(trainer: Trainer, calls: int) -> dict[str, float]:
    """Milliseconds of each part of a step run alone (one warm-up call, then the mean of `calls`), in the step's
    autocast: teacher forward; student forward + backward from a fixed random gradient on its final hidden states;
    the fused KL forward + backward from stored hidden states of both models; clipping + the AdamW step."""
    loss_fn, device = trainer.loss_fn, trainer.device
    teacher, student = loss_fn.teacher, loss_fn.student
    rows = trainer.batches.local_rows(0, trainer.dist.rank, trainer.dist.world_size)[: trainer.cfg.micro_batch]
    rows = rows.to(device)

    with torch.no_grad(), autocast_context(device, trainer.amp_dtype):
        teacher_hidden = final_hidden(teacher, rows).flatten(0, 1)
        student_hidden = final_hidden(student, rows)
    hidden_grad = torch.randn_like(student_hidden)
    kl_student_hidden = student_hidden.flatten(0, 1).detach().requires_grad_()

    def teacher_forward() -> None:
        with torch.no_grad(), autocast_context(device, trainer.amp_dtype):
            final_hidden(teacher, rows)

    def student_forward_backward() -> None:
        with autocast_context(device, trainer.amp_dtype):
            hidden = final_hidden(student, rows)
        hidden.backward(hidden_grad)

    def fused_kl() -> None:
        with autocast_context(device, trainer.amp_dtype):
            loss = fused_linear_kl(kl_student_hidden, output_weight(student), teacher_hidden=teacher_hidden,
                                   teacher_weight=output_weight(teacher), chunk_size=loss_fn.chunk_size)
        loss.backward()

    def optimizer_step() -> None:
        # The gradients are those the parts above accumulated, kept so that every call updates every weight.
        torch.nn.utils.clip_grad_norm_(trainer.params, trainer.cfg.grad_clip)
        trainer.optimizer.step()

    parts = {"teacher_fwd_ms": teacher_forward, "student_fwd_bwd_ms": student_forward_backward,
             "kl_fwd_bwd_ms": fused_kl, "optimizer_ms": optimizer_step}
    result = {}
    for key, part in parts.items():
        part()
        result[key] = mean_ms(part, calls, device)
    trainer.optimizer.zero_grad(set_to_none=True)
    return result


def write_profile(trainer: Trainer, directory: Path, name: str, rows: int = 60) -> None:
    """torch.profiler over one optimizer step: the operators and kernels that took the most device (or, on a CPU,
    host) time, as a table in DIR/name (and $OUT/name)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_gpu = trainer.device.type == "cuda"
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        trainer.train_step()
        if on_gpu:
            torch.cuda.synchronize(trainer.device)
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=90)
    targets = [directory] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for target in dict.fromkeys(targets):
        target.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(table + "\n")


def out_of_memory(err: Exception) -> bool:
    """Whether `err` is a GPU allocation failure: torch's OutOfMemoryError, or cuBLAS failing to allocate its
    workspace (a RuntimeError naming CUBLAS_STATUS_ALLOC_FAILED)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "ALLOC_FAILED" in str(err)


def measure(student, teacher, batch: int, args, device: torch.device, amp_dtype: Optional[torch.dtype],
            peak_tflops: Optional[float], dist: DistInfo) -> dict:
    """One row: the mean step time over args.steps after args.warmup steps, rates, MFU, peak memory, status.
    Under torchrun `batch` rows run on every rank; the FLOPs, MFU and peak memory are one GPU's."""
    rows_per_step = batch * args.accumulation
    flops = step_flops(student, teacher, rows_per_step, args.ctx)
    row = {"batch": batch, "accumulation": args.accumulation, "ctx": args.ctx, "gpus": dist.world_size,
           "checkpointing": args.checkpointing, "compile": args.compile,
           "model_tflops_per_step": flops / 1e12, "status": "ok"}
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = None
    stage = "setup"
    try:
        trainer = distill_trainer(student, teacher, batch, args, device, amp_dtype, dist)
        stage = "warm-up"
        # Trainer.train_step: the step of Trainer.fit without its logging and checkpointing (a checkpoint of the 2B
        # student is ~20 GB).
        for _ in range(args.warmup):
            trainer.train_step()
        stage = "timed steps"
        ms = mean_ms(trainer.train_step, args.steps, device)
        row.update(ms_per_step=ms, tokens_per_s=dist.world_size * rows_per_step * args.ctx / (ms * 1e-3),
                   model_tflops_per_s=flops / (ms * 1e-3) / 1e12)
        row["mfu"] = row["model_tflops_per_s"] / peak_tflops if peak_tflops else None
        if args.breakdown:
            stage = "breakdown"
            parts = breakdown_ms(trainer, args.steps)
            per_micro_batch = parts["teacher_fwd_ms"] + parts["student_fwd_bwd_ms"] + parts["kl_fwd_bwd_ms"]
            row.update(parts, rest_ms=ms - args.accumulation * per_micro_batch - parts["optimizer_ms"])
        if args.profile and dist.is_main:
            stage = "profile"
            write_profile(trainer, args.out, f"halo_step_profile_b{batch}.txt")
    except Exception as err:  # noqa: BLE001 - one failed batch size must not lose the rest of the sweep
        if dist.enabled:
            raise
        if out_of_memory(err):
            row["status"] = f"OOM during {stage}"
        else:
            traceback.print_exc()  # the row keeps the message; the traceback is for whoever reads the log
            row["status"] = f"error during {stage}: {type(err).__name__}: {err}"[:300]
    if on_gpu:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # Free the AdamW state and the gradients before the next batch size measures its own peak memory.
    trainer = None
    student.zero_grad(set_to_none=True)
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return row


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def batch_sizes(text: str) -> list[int]:
    try:
        return sorted({positive_int(part) for part in text.split(",")})
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}") from None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=batch_sizes, default=[8], help="comma-separated micro batch sizes (rows)")
    parser.add_argument("--ctx", type=positive_int, default=512, help="tokens per row")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed optimizer steps per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before them")
    parser.add_argument("--layers", type=positive_int, default=28, help="layers of both models (28 = real shapes)")
    parser.add_argument("--accumulation", type=positive_int, default=1,
                        help="micro batches per optimizer step (gradient accumulation)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the student")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoder layers of both models (halo distill's default on CUDA)")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of a step alone")
    parser.add_argument("--profile", action="store_true",
                        help="also write a torch.profiler table of one step: DIR/halo_step_profile_b<batch>.txt")
    parser.add_argument("--loss-chunk-size", type=positive_int, default=HaloConfig().loss_chunk_size,
                        help="tokens per chunk of the fused KL")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="bf16 dense peak of the card for the MFU (default: the datasheet value of H100/H200)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory of halo_step.json")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (the benchmark) or cpu (a smoke run)")
    parser.add_argument("--shapes", choices=("real", "tiny"), default=None,
                        help="model widths: real (default on cuda) or tiny (default on cpu)")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benches.halo_step needs a CUDA device (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    dist = init_distributed(args.device)
    device = resolve_device(args.device, dist)
    shapes = args.shapes or ("real" if device.type == "cuda" else "tiny")
    peak_tflops = args.peak_tflops
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = datasheet_peak_tflops(torch.cuda.get_device_name(device))
        if peak_tflops is None:
            parser.error(f"--peak-tflops is required on {torch.cuda.get_device_name(device)!r}: its bf16 dense "
                         "datasheet peak is not known here")
    if device.type == "cuda":
        # As halo.runtime.Runtime.create does: any float32 matmul runs on TF32 tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
    amp_dtype = autocast_dtype(device, "auto")
    torch.manual_seed(0)

    description = device_description()
    ranks = f", {dist.world_size} ranks" if dist.enabled else ""
    title = (f"HALO stage-2 step, HypeNet-2B student + Qwen3-1.7B teacher ({args.layers} layers, {shapes} widths"
             f"{ranks}), ctx {args.ctx}, accumulation {args.accumulation}, checkpointing "
             f"{'on' if args.checkpointing else 'off'}, compile {'on' if args.compile else 'off'} - {description}")
    say = print if dist.is_main else (lambda *_, **__: None)  # one report per run, from rank 0
    say(f"# {title}", flush=True)
    student, teacher = build_models(args.layers, shapes, device, amp_dtype)
    if args.checkpointing:
        enable_activation_checkpointing(student)
    if args.compile:
        compile_decoder_layers(student)
        compile_decoder_layers(teacher)
    flops_info = {"student_forward_flops_per_token": forward_flops_per_token(student, args.ctx),
                  "teacher_forward_flops_per_token": forward_flops_per_token(teacher, args.ctx),
                  "student_matmul_parameters": matmul_parameters(student),
                  "teacher_matmul_parameters": matmul_parameters(teacher),
                  "student_parameters": sum(p.numel() for p in student.parameters())}
    mfu_basis = f"MFU over {peak_tflops:g} TFLOP/s" if peak_tflops else "no MFU (no peak on a CPU)"
    say("# " + ", ".join(f"{key} {value:.4g}" for key, value in flops_info.items()) + f"; {mfu_basis}",
          flush=True)
    say(format_rows([], COLUMNS), flush=True)

    name = "halo_step" + (f"_{dist.world_size}gpu" if dist.enabled else "") \
        + ("_checkpointing" if args.checkpointing else "") + ".json"
    targets = [args.out]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]))
    rows: list[dict] = []

    def save() -> None:
        if not dist.is_main:
            return
        payload = {"device": description, "gpus": dist.world_size, "layers": args.layers, "shapes": shapes, "ctx": args.ctx,
                   "steps": args.steps, "warmup": args.warmup, "accumulation": args.accumulation,
                   "checkpointing": args.checkpointing, "compile": args.compile,
                   "loss_chunk_size": args.loss_chunk_size, "autocast": str(amp_dtype), "peak_tflops": peak_tflops,
                   "measured_bf16_matmul_tflops": measured_peak("bf16_tflops"), **flops_info, "rows": rows}
        for target in dict.fromkeys(targets):
            target.mkdir(parents=True, exist_ok=True)
            (target / name).write_text(json.dumps(payload, indent=2) + "\n")

    failed = None
    for batch in args.batches:
        if failed is not None:
            rows.append({"batch": batch, "accumulation": args.accumulation, "ctx": args.ctx,
                         "checkpointing": args.checkpointing,
                         "status": f"OOM (skipped: OOM at batch {failed})"})
        else:
            rows.append(measure(student, teacher, batch, args, device, amp_dtype, peak_tflops, dist))
            if rows[-1]["status"].startswith("OOM"):
                failed = batch
        say(format_rows(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
        save()

    say(format_rows(rows, COLUMNS))
    if args.breakdown:
        say(format_rows(rows, BREAKDOWN_COLUMNS))
    for target in dict.fromkeys(targets):
        say(f"# wrote {target / name}")
    return 1 if any(row["status"].startswith("error") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
