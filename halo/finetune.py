"""Stage 3: long-context finetuning (SPEC 2, step 4).

No teacher: next-token cross entropy (fused chunked CE) on packed rows of ``finetune.seq_len``
tokens, starting from the stage-2 student. HyPE scaling stays off; gradient checkpointing is on
by default (long rows).
"""

from __future__ import annotations

import torch

from . import evals
from .distill import STUDENT_DIR, train_student
from .losses import fused_linear_cross_entropy
from .runtime import Runtime
from .train import compile_decoder_layers, compile_enabled, enable_activation_checkpointing


def load_student(runtime: Runtime, stage: str):
    """The HypeNet student saved by ``stage`` ("distill" or "finetune"), fp32 on the run's device."""
    import hypenet.modeling  # noqa: F401 - registers HypeNet with the transformers Auto classes
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runtime.stage_dir(stage) / STUDENT_DIR, dtype=torch.float32)
    return model.to(runtime.device)


class NextTokenLoss:
    """input_ids [b, T] -> (mean next-token CE over the b*(T-1) predictions, {})."""

    def __init__(self, model, chunk_size: int):
        self.model, self.chunk_size = model, chunk_size

    def __call__(self, input_ids: torch.Tensor):
        hidden = evals.final_hidden(self.model, input_ids)[:, :-1]
        loss = fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), evals.output_weight(self.model),
                                          input_ids[:, 1:].reshape(-1), chunk_size=self.chunk_size)
        return loss, {}


def run_finetune(runtime: Runtime) -> dict:
    cfg = runtime.config.finetune
    student = load_student(runtime, "distill")
    student.config.attn_logits_scaling = None
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(student)
    if compile_enabled(cfg.compile, runtime.device):
        runtime.log("[finetune] torch.compile on the decoder layers: the first step includes the compilation "
                    "(finetune.compile=false to skip)")
        compile_decoder_layers(student)
    return train_student(runtime, "finetune", student, NextTokenLoss(student, runtime.config.loss_chunk_size), cfg)
