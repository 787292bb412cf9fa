"""Stage 2: end-to-end distillation (SPEC 2, step 3).

The student is HypeNet with the layout chosen by ``select``: its attention layers come from the
teacher (RoPE removed, a new output gate ``o_gate``), its Lightning layers are the stage-1
candidates, everything else (embeddings, norms, MLPs, lm_head) is the teacher's. The teacher is
frozen; the loss is the forward KL(p_teacher || p_student) per token at temperature 1, mean over
tokens, computed by the fused chunked loss (no [tokens, vocab] logits of either model are held).
HyPE scaling is off while training.
"""

from __future__ import annotations

import torch

from . import evals
from .losses import fused_linear_kl
from .runtime import Runtime
from .train import Trainer, compile_decoder_layers, compile_enabled, enable_activation_checkpointing

STUDENT_DIR = "student"


def build_student(runtime: Runtime, mixer_types: list[str], candidates: torch.nn.ModuleList):
    """HypeNetForCausalLM from the teacher with ``mixer_types``; Lightning layers loaded from ``candidates``."""
    from hypenet.convert import convert_qwen3

    lightning_layers = {i: candidates[i] for i, mixer in enumerate(mixer_types) if mixer == "lightning-attn"}
    return convert_qwen3(runtime.teacher(), mixer_types, lightning_layers=lightning_layers, dtype=torch.float32)


class DistillationLoss:
    """input_ids [b, T] -> (mean forward KL over all b*T tokens, {})."""

    def __init__(self, teacher, student, chunk_size: int):
        self.teacher, self.student, self.chunk_size = teacher, student, chunk_size

    def __call__(self, input_ids: torch.Tensor):
        with torch.no_grad():
            teacher_hidden = evals.final_hidden(self.teacher, input_ids)
        student_hidden = evals.final_hidden(self.student, input_ids)
        loss = fused_linear_kl(student_hidden.reshape(-1, student_hidden.shape[-1]), evals.output_weight(self.student),
                               teacher_hidden=teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
                               teacher_weight=evals.output_weight(self.teacher), chunk_size=self.chunk_size)
        return loss, {}


def run_distill(runtime: Runtime, mixer_types: list[str], candidates: torch.nn.ModuleList) -> dict:
    cfg = runtime.config.distill
    student = build_student(runtime, mixer_types, candidates)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(student)
    if compile_enabled(cfg.compile, runtime.device):
        runtime.log("[distill] torch.compile on the decoder layers: the first step includes the compilation "
                    "(distill.compile=false to skip)")
        compile_decoder_layers(student)
        compile_decoder_layers(runtime.teacher())
    if runtime.dist.enabled:  # o_gate is new: start every rank from rank 0's values
        for tensor in student.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    loss_fn = DistillationLoss(runtime.teacher(), student, runtime.config.loss_chunk_size)
    return train_student(runtime, "distill", student, loss_fn, cfg)


def train_student(runtime: Runtime, stage: str, student, loss_fn, cfg) -> dict:
    """Train the student of `stage` (stage 2 or 3) with `loss_fn`, save it as an HF checkpoint once finished, and
    summarise the run."""
    out = runtime.stage_dir(stage)
    trainer = Trainer(name=stage, module=student, loss_fn=loss_fn, batches=runtime.train_batches(cfg), cfg=cfg,
                      out_dir=out, dist=runtime.dist, device=runtime.device, amp_dtype=runtime.amp_dtype,
                      progress=runtime.progress)
    result = trainer.fit()
    if result.finished and runtime.dist.is_main:
        student.save_pretrained(out / STUDENT_DIR, safe_serialization=True)
        runtime.tokenizer().save_pretrained(out / STUDENT_DIR)
    return {"steps": result.step, "finished": result.finished,
            "first_loss": result.records[0]["loss"] if result.records else None,
            "final_loss": result.records[-1]["loss"] if result.records else None}
