"""The final report of a HALO run: teacher vs student on held-out LM loss and passkey retrieval at
1x..16x the training length, next to the per-stage losses and the layer-importance table.
Written as report.json, report.md, lm_loss_by_length.png and passkey.png in the output folder."""

from __future__ import annotations

import json

from . import evals
from .alpha import set_logits_scaling
from .export import load_exported
from .plots import length_plot
from .runtime import Runtime
from .select import importance_table
from .train import barrier


def evaluate_model(runtime: Runtime, model) -> dict:
    cfg = runtime.config
    splits = runtime.splits()
    base = cfg.eval_base_length
    lengths = [int(round(m * base)) for m in cfg.eval.multipliers]
    with runtime.autocast():
        lm = evals.lm_loss(model, evals.heldout_rows(splits.heldout_stream, base, cfg.eval.lm_rows))
        # The same held-out token budget at every length: fewer, longer rows.
        lm_by_length = {str(n): evals.lm_loss(model, evals.heldout_rows(
            splits.heldout_stream, n, max(1, cfg.eval.lm_rows * base // n)))["loss"] for n in lengths}
        passkey = evals.passkey_accuracy(model, runtime.tokenizer(), splits.heldout_stream, lengths,
                                         num_samples=cfg.eval.passkey_samples, seed=cfg.seed + 1)
    return {"lm_loss": lm["loss"], "next_token_accuracy": lm["accuracy"], "lm_tokens": lm["tokens"],
            "lm_loss_by_length": lm_by_length, "passkey": {str(k): v for k, v in passkey.items()}}


def _multiple(length: int, base: int) -> str:
    return f"{length // base}x" if length % base == 0 else f"{length / base:g}x"


def _markdown(runtime: Runtime, summaries: dict, results: dict) -> str:
    cfg = runtime.config
    base = cfg.eval_base_length
    lines = ["# HALO report", "",
             f"Teacher: `{cfg.teacher}`. Training length (1x) {base} tokens; "
             f"finetune length {cfg.finetune.seq_len}.", "", "## Stages", "",
             "| stage | steps | first loss | final loss | seconds |", "|---|---|---|---|---|"]
    loss_names = {"align": "MSE", "distill": "KL", "finetune": "CE"}
    for stage, name in loss_names.items():
        s = summaries.get(stage, {})
        if s.get("first_loss") is not None:
            lines.append(f"| {stage} ({name}) | {s['steps']} | {s['first_loss']:.4f} | {s['final_loss']:.4f} | "
                         f"{s.get('seconds', '')} |")
    for stage in ("select", "export", "alpha"):
        if stage in summaries:
            lines.append(f"| {stage} | | | | {summaries[stage].get('seconds', '')} |")
    if "select" in summaries and "layers" in summaries["select"]:
        sel = summaries["select"]
        lines += ["", f"## Layer selection ({sel['method']}): attention layers {sel['attention_layers']}", "",
                  importance_table(sel)]
    if summaries.get("alpha", {}).get("losses"):
        a = summaries["alpha"]
        lines += ["", f"## HyPE a (held-out loss at {a['seq_len']} tokens, {a['rows']} rows)", "",
                  "| a | loss |", "|---|---|", f"| none | {a['loss_without_scaling']:.4f} |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in a["losses"].items()]
        lines.append(f"\nChosen: `attn_logits_scaling = \"{a['attn_logits_scaling']}\"`.")
    names = list(results)
    lines += ["", f"## Held-out LM loss ({base}-token rows)", "", "| model | loss (nats/token) | next-token acc. |",
              "|---|---|---|"]
    lines += [f"| {n} | {results[n]['lm_loss']:.4f} | {results[n]['next_token_accuracy']:.4f} |" for n in names]
    lengths = list(results[names[0]]["passkey"])
    header = "| model | " + " | ".join(_multiple(int(n), base) + f" ({n})" for n in lengths) + " |"
    rule = "|---|" + "---|" * len(lengths)
    lines += ["", f"## Held-out LM loss by sequence length ({cfg.eval.lm_rows * base} tokens per length)", "",
              header, rule]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{results[n]['lm_loss_by_length'][k]:.3f}" for k in lengths) + " |")
    lines += ["", f"## Passkey retrieval: exact match (digit accuracy), {cfg.eval.passkey_samples} samples per "
              "length", "", header, rule]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(
            f"{results[n]['passkey'][k]['accuracy']:.2f} ({results[n]['passkey'][k]['digit_accuracy']:.2f})"
            for k in lengths) + " |")
    return "\n".join(lines) + "\n"


def write_report(runtime: Runtime, summaries: dict) -> dict:
    """Evaluate teacher and exported student (with and without its HyPE scaling) and write the report."""
    results: dict = {}
    if runtime.dist.is_main:
        export_dir = runtime.stage_dir("export")
        results["teacher"] = evaluate_model(runtime, runtime.teacher())
        student = load_exported(export_dir, runtime.device)
        scaling = student.config.attn_logits_scaling
        results[f"student ({scaling})"] = evaluate_model(runtime, student)
        set_logits_scaling(student, None)
        results["student (no scaling)"] = evaluate_model(runtime, student)
        (runtime.out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
        markdown = _markdown(runtime, summaries, results)
        (runtime.out / "report.md").write_text(markdown)
        passkey = {name: {int(k): v["accuracy"] for k, v in r["passkey"].items()} for name, r in results.items()}
        runtime.log(length_plot(passkey, runtime.out / "passkey.png", "passkey retrieval", "exact match",
                                unit_interval=True))
        losses = {name: {int(k): v for k, v in r["lm_loss_by_length"].items()} for name, r in results.items()}
        runtime.log(length_plot(losses, runtime.out / "lm_loss_by_length.png", "held-out LM loss",
                                "nats / token"))
    barrier(runtime.dist)
    return results
