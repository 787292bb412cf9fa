"""Stage 1: hidden-state alignment (SPEC 2, step 1).

Every teacher layer gets a Lightning candidate built by weight transfer from its attention. The
teacher runs normally, frozen and without gradient; forward hooks on each attention module catch
its input (the normed hidden states), the rotary tables and its output. Each candidate sees that
same input and is trained to reproduce that output: loss = mean over layers of the MSE (mean over
B, T, d). Only the candidates train.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .runtime import Runtime
from .train import Trainer

CANDIDATES_FILE = "candidates.safetensors"


def build_candidates(teacher) -> torch.nn.ModuleList:
    """One Lightning layer per teacher layer, initialised from its attention by weight transfer."""
    from hypenet.convert import hypenet_config_from_qwen3, lightning_from_qwen3_attention

    num_layers = len(teacher.model.layers)
    config = hypenet_config_from_qwen3(teacher.config, ["lightning-attn"] * num_layers)
    candidates = torch.nn.ModuleList(
        lightning_from_qwen3_attention(layer.self_attn, config, i) for i, layer in enumerate(teacher.model.layers)
    )
    return candidates.to(device=next(teacher.parameters()).device, dtype=torch.float32)


@contextlib.contextmanager
def capture_attention_io(teacher):
    """Record, per layer, (attention input, rotary tables, attention output) of each teacher forward."""
    captured: dict[int, tuple] = {}
    handles = []

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[index] = (hidden.detach(), kwargs.get("position_embeddings"), output[0].detach())

        return hook

    for index, layer in enumerate(teacher.model.layers):
        handles.append(layer.self_attn.register_forward_hook(make_hook(index), with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class AlignmentLoss:
    """input_ids [b, T] -> (mean over layers of MSE(candidate_i(x_i), attn_i(x_i)), per-layer MSEs)."""

    def __init__(self, teacher, candidates: torch.nn.ModuleList, captured: dict):
        self.teacher, self.candidates, self.captured = teacher, candidates, captured

    def __call__(self, input_ids: torch.Tensor):
        self.captured.clear()
        with torch.no_grad():
            self.teacher.model(input_ids=input_ids)
        layer_losses = []
        for index, candidate in enumerate(self.candidates):
            hidden, rotary, target = self.captured[index]
            prediction = candidate(hidden, position_embeddings=rotary)
            layer_losses.append(F.mse_loss(prediction.float(), target.float()))
        losses = torch.stack(layer_losses)
        return losses.mean(), {f"mse_layer_{i}": float(v) for i, v in enumerate(losses.detach())}


def load_candidates(runtime: Runtime) -> torch.nn.ModuleList:
    """The stage-1 candidates of a finished align stage."""
    candidates = build_candidates(runtime.teacher())
    state = load_file(str(runtime.stage_dir("align") / CANDIDATES_FILE), device=str(runtime.device))
    candidates.load_state_dict(state)
    return candidates


def run_align(runtime: Runtime) -> dict:
    cfg = runtime.config.align
    teacher = runtime.teacher()
    candidates = build_candidates(teacher)
    if runtime.dist.enabled:  # new parameters (z_proj) start identical on every rank
        for tensor in candidates.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    out = runtime.stage_dir("align")
    with capture_attention_io(teacher) as captured:
        trainer = Trainer(name="align", module=candidates, loss_fn=AlignmentLoss(teacher, candidates, captured),
                          batches=runtime.train_batches(cfg), cfg=cfg, out_dir=out, dist=runtime.dist,
                          device=runtime.device, amp_dtype=runtime.amp_dtype, progress=runtime.progress)
        result = trainer.fit()
    summary = {"steps": result.step, "finished": result.finished,
               "first_loss": result.records[0]["loss"] if result.records else None,
               "final_loss": result.records[-1]["loss"] if result.records else None,
               "final_layer_mse": {k: v for k, v in (result.records[-1] if result.records else {}).items()
                                   if k.startswith("mse_layer_")}}
    if result.finished and runtime.dist.is_main:
        save_file({k: v.detach().contiguous().cpu() for k, v in candidates.state_dict().items()},
                  str(out / CANDIDATES_FILE))
    return summary
