"""`halo demo`: convert the shipped tiny Qwen3 teacher into HypeNet end to end, in minutes on a CPU.

Every HALO stage runs with small step counts on the shipped Python-documentation corpus (30% of
training rows are passkey sequences, as for the teacher), then the report compares teacher and
student: per-stage losses, the layer-importance table, and held-out LM loss and passkey retrieval
at 1x..16x the training length (256 tokens). Report and plots land in the output folder.
"""

from __future__ import annotations

import time

from .config import load_config
from .teacher import TEACHER_HELDOUT_FRACTION, TEACHER_SEQ_LEN

DEMO_SETTINGS = {
    "teacher": "builtin",
    "output_dir": "halo_runs/demo",
    "device": "auto",  # the GPU when there is one (bf16 autocast), else the CPU (float32: the README's numbers)
    "loss_chunk_size": 512,
    "data": {"corpus": "builtin", "heldout_fraction": TEACHER_HELDOUT_FRACTION, "passkey_fraction": 0.3},
    "align": {"steps": 40, "lr": 3e-3, "min_lr": 1e-4, "warmup_steps": 5, "seq_len": TEACHER_SEQ_LEN,
              "global_batch": 8, "micro_batch": 8, "checkpoint_every": 20, "log_every": 10},
    "select": {"recall_multipliers": [1.0], "recall_samples": 24, "quality_rows": 8},
    # compile off: compiling the layers would take longer than these tiny stages run.
    "distill": {"steps": 100, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "seq_len": TEACHER_SEQ_LEN,
                "global_batch": 8, "micro_batch": 8, "checkpoint_every": 40, "log_every": 10, "compile": False},
    "finetune": {"steps": 20, "lr": 2e-4, "min_lr": 2e-4, "warmup_steps": 2, "schedule": "constant",
                 "seq_len": 4 * TEACHER_SEQ_LEN, "global_batch": 2, "micro_batch": 2, "checkpoint_every": 10,
                 "log_every": 5, "gradient_checkpointing": False, "compile": False},
    "alpha": {"grid": [30.0, 100.0, 300.0, 1000.0, 3000.0], "seq_len": 16 * TEACHER_SEQ_LEN, "num_rows": 2},
    "eval": {"base_length": TEACHER_SEQ_LEN, "multipliers": [1.0, 2.0, 4.0, 8.0, 16.0], "passkey_samples": 8,
             "lm_rows": 16},
}


def run_demo(output_dir: str | None = None, overrides: list[str] = (), progress: bool = True) -> dict:
    import torch

    from .pipeline import run_all
    from .runtime import Runtime

    settings = dict(DEMO_SETTINGS)
    if output_dir is not None:
        settings["output_dir"] = output_dir
    config = load_config(None, list(overrides), base=settings)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    start = time.perf_counter()
    runtime = Runtime.create(config, progress=progress)
    summaries = run_all(runtime)
    seconds = time.perf_counter() - start
    if runtime.dist.is_main:
        report = (runtime.out / "report.md").read_text()
        print("\n" + report)
        print(f"demo finished in {seconds / 60:.1f} min; report, logs and plots in {runtime.out}/")
    summaries["demo_seconds"] = seconds
    return summaries
