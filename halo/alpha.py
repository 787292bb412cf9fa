"""Choosing the HyPE constant a (SPEC 2, step 5).

HyPE scales the attention logits of the query at position t by s_t = ln(t + a) / ln(a). Training
runs without it; afterwards a is chosen from ``alpha.grid`` as the value with the lowest LM loss on
``alpha.num_rows`` held-out rows of ``alpha.seq_len`` tokens (long, unseen text), and
``attn_logits_scaling = "hype <a>"`` is written into the exported config.json. The loss without
scaling is reported next to the grid.
"""

from __future__ import annotations

import json
import os

import torch

from . import evals
from .export import load_exported
from .plots import alpha_plot
from .runtime import Runtime


def format_scaling(alpha: float) -> str:
    """The config value for HyPE with constant a: 'hype 500' (integers printed without a decimal point)."""
    return f"hype {int(alpha)}" if float(alpha).is_integer() else f"hype {alpha:g}"


def set_logits_scaling(model, value) -> None:
    """Switch the attention-logit scaling of a loaded HypeNet model in place: the HyPE layers read it from the
    model's config at every call."""
    from hypenet.config import parse_attn_logits_scaling

    parse_attn_logits_scaling(value)  # raises on a malformed value before anything changes
    model.config.attn_logits_scaling = value


def write_scaling_to_config(checkpoint_dir, value) -> None:
    """Set ``attn_logits_scaling`` in a checkpoint's config.json (atomic rewrite)."""
    path = checkpoint_dir / "config.json"
    config = json.loads(path.read_text())
    config["attn_logits_scaling"] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@torch.no_grad()
def run_alpha(runtime: Runtime) -> dict:
    cfg = runtime.config.alpha
    export_dir = runtime.stage_dir("export")
    if not (export_dir / "config.json").is_file():
        raise RuntimeError(f"alpha needs the exported checkpoint in {export_dir}; run `halo export` first")
    summary: dict = {}
    if runtime.dist.is_main:
        model = load_exported(export_dir, runtime.device)
        rows = evals.heldout_rows(runtime.splits().heldout_stream, cfg.seq_len, cfg.num_rows)
        losses = {}
        with runtime.autocast():
            set_logits_scaling(model, None)
            no_scaling = evals.lm_loss(model, rows)["loss"]
            for alpha in cfg.grid:
                set_logits_scaling(model, format_scaling(alpha))
                losses[alpha] = evals.lm_loss(model, rows)["loss"]
                runtime.log(f"[alpha] a = {alpha:g}: held-out loss {losses[alpha]:.4f} at {cfg.seq_len} tokens")
        best = min(cfg.grid, key=lambda a: (losses[a], a))
        write_scaling_to_config(export_dir, format_scaling(best))
        out = runtime.stage_dir("alpha")
        out.mkdir(parents=True, exist_ok=True)
        summary = {"seq_len": cfg.seq_len, "rows": int(rows.shape[0]), "loss_without_scaling": no_scaling,
                   "losses": {str(a): losses[a] for a in cfg.grid}, "alpha": best,
                   "attn_logits_scaling": format_scaling(best)}
        (out / "alpha.json").write_text(json.dumps(summary, indent=2) + "\n")
        runtime.log(alpha_plot(losses, out / "alpha.png", f"held-out loss at {cfg.seq_len} tokens vs HyPE a"))
    return summary
