"""Attention-layer selection (SPEC 2, step 2).

For each layer i, M(i) is the teacher with only layer i's attention replaced by its stage-1
Lightning candidate. Two scores of M(i), higher is better:

- R(i), recall: passkey retrieval, the mean fraction of answer digits predicted correctly
  (teacher-forced argmax) over ``select.recall_samples`` sequences at each length
  ``select.recall_multipliers x eval base length``. Digit accuracy rather than exact match gives a
  finer signal with few samples.
- C(i), general quality: minus the mean next-token loss (nats) on ``select.quality_rows``
  held-out rows of the base length. (A held-out LM loss needs no benchmark download and moves
  smoothly with every layer swap, unlike small multiple-choice sets.)

HALO importance: ``(max_j R_j - R_i) / (max_j C_j - C_i + eps)``, clipped at ``select.clip``
(only the best-C layer, whose denominator is eps, can exceed it). A layer whose replacement costs
much recall but little quality is important to keep as attention. The baseline
(``select.method = "baseline"``, Jet-Nemotron style) ranks by ``R_teacher - R_i``. The top
``num_attention`` layers (default floor(L/4)) stay attention.
"""

from __future__ import annotations

import contextlib
import json

import torch
import torch.distributed as torch_dist

from . import evals
from .plots import layer_importance_plot
from .runtime import Runtime


def halo_importance(recall: list[float], quality: list[float], *, eps: float, clip: float) -> list[float]:
    """(max R - R_i) / (max C - C_i + eps), clipped to [0, clip]."""
    if len(recall) != len(quality) or not recall:
        raise ValueError(f"recall and quality must be non-empty and of equal length, got {len(recall)} and "
                         f"{len(quality)}")
    best_recall, best_quality = max(recall), max(quality)
    return [min((best_recall - r) / (best_quality - c + eps), clip) for r, c in zip(recall, quality)]


def baseline_importance(recall: list[float], teacher_recall: float) -> list[float]:
    """Jet-Nemotron style: the recall lost by replacing the layer, R_teacher - R_i."""
    return [teacher_recall - r for r in recall]


def choose_attention_layers(importance: list[float], num_attention: int) -> list[int]:
    """Indices of the ``num_attention`` most important layers, ascending (ties: lower index first)."""
    if not 0 <= num_attention <= len(importance):
        raise ValueError(f"num_attention must be in [0, {len(importance)}], got {num_attention}")
    order = sorted(range(len(importance)), key=lambda i: (-importance[i], i))
    return sorted(order[:num_attention])


def default_num_attention(num_layers: int) -> int:
    return num_layers // 4


class CandidateAsAttention(torch.nn.Module):
    """A Lightning candidate behind the call signature of a transformers attention module.

    The decoder layer passes the normed hidden states, the rotary (cos, sin) tables and a causal
    mask; the candidate is causal by construction and has no padding here, so the mask is unused.
    Returns (output, None) as transformers attention modules do.
    """

    def __init__(self, candidate: torch.nn.Module):
        super().__init__()
        self.candidate = candidate

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        return self.candidate(hidden_states, position_embeddings=position_embeddings), None


@contextlib.contextmanager
def swapped_attention(teacher, layer: int, module: torch.nn.Module):
    """Temporarily replace ``teacher.model.layers[layer].self_attn`` by ``module``."""
    decoder_layer = teacher.model.layers[layer]
    original = decoder_layer.self_attn
    decoder_layer.self_attn = module
    try:
        yield teacher
    finally:
        decoder_layer.self_attn = original


def score_model(runtime: Runtime, model) -> tuple[float, float]:
    """(R, C) of a model: mean passkey digit accuracy, minus held-out LM loss."""
    cfg = runtime.config
    splits = runtime.splits()
    base = cfg.eval_base_length
    lengths = [int(round(m * base)) for m in cfg.select.recall_multipliers]
    with runtime.autocast():
        passkey = evals.passkey_accuracy(model, runtime.tokenizer(), splits.heldout_stream, lengths,
                                         num_samples=cfg.select.recall_samples, seed=cfg.seed + 17)
        quality = evals.lm_loss(model, evals.heldout_rows(splits.heldout_stream, base, cfg.select.quality_rows)
                                .to(runtime.device))
    recall = sum(v["digit_accuracy"] for v in passkey.values()) / len(passkey)
    return recall, -quality["loss"]


def _gather_scores(runtime: Runtime, local: dict[int, tuple[float, float]]) -> dict[int, tuple[float, float]]:
    if not runtime.dist.enabled:
        return local
    gathered: list = [None] * runtime.dist.world_size
    torch_dist.all_gather_object(gathered, local)
    merged: dict[int, tuple[float, float]] = {}
    for part in gathered:
        merged.update(part)
    return merged


def run_select(runtime: Runtime, candidates: torch.nn.ModuleList) -> dict:
    """Score every M(i), rank the layers, write select/scores.json and importance.png; returns the summary.

    Layers are spread over ranks (layer i on rank i mod world_size).
    """
    cfg = runtime.config
    teacher = runtime.teacher()
    num_layers = len(teacher.model.layers)
    num_attention = cfg.select.num_attention if cfg.select.num_attention is not None else \
        default_num_attention(num_layers)
    teacher_recall, teacher_quality = score_model(runtime, teacher)
    local = {}
    for layer in range(runtime.dist.rank, num_layers, runtime.dist.world_size):
        candidate = candidates[layer].to(runtime.device).eval()
        with swapped_attention(teacher, layer, CandidateAsAttention(candidate)):
            local[layer] = score_model(runtime, teacher)
        runtime.log(f"[select] layer {layer}: R {local[layer][0]:.4f}  C {local[layer][1]:.4f}")
    scores = _gather_scores(runtime, local)
    recall = [scores[i][0] for i in range(num_layers)]
    quality = [scores[i][1] for i in range(num_layers)]
    if cfg.select.method == "halo":
        importance = halo_importance(recall, quality, eps=cfg.select.eps, clip=cfg.select.clip)
    else:
        importance = baseline_importance(recall, teacher_recall)
    attention_layers = choose_attention_layers(importance, num_attention)
    mixer_types = ["attn" if i in attention_layers else "lightning-attn" for i in range(num_layers)]
    summary = {
        "method": cfg.select.method, "recall_metric": "passkey digit accuracy",
        "quality_metric": "minus held-out LM loss (nats/token)",
        "teacher": {"recall": teacher_recall, "quality": teacher_quality},
        "layers": [{"layer": i, "recall": recall[i], "quality": quality[i], "importance": importance[i],
                    "attention": i in attention_layers} for i in range(num_layers)],
        "attention_layers": attention_layers, "mixer_types": mixer_types,
    }
    if runtime.dist.is_main:
        out = runtime.stage_dir("select")
        out.mkdir(parents=True, exist_ok=True)
        (out / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")
        runtime.log(layer_importance_plot(importance, attention_layers, out / "importance.png",
                                          f"layer importance ({cfg.select.method})"))
    return summary


def importance_table(summary: dict) -> str:
    """Markdown table of the per-layer scores of a select summary."""
    lines = ["| layer | R (passkey digit acc.) | C (-LM loss) | importance | kept as attention |",
             "|---|---|---|---|---|",
             f"| teacher | {summary['teacher']['recall']:.3f} | {summary['teacher']['quality']:.3f} | | |"]
    for row in summary["layers"]:
        lines.append(f"| {row['layer']} | {row['recall']:.3f} | {row['quality']:.3f} | {row['importance']:.3f} | "
                     f"{'yes' if row['attention'] else ''} |")
    return "\n".join(lines)
