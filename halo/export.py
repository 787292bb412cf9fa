"""Export: the final student as a Hugging Face checkpoint (SPEC 2, step 5).

The checkpoint folder holds config.json (model_type "hypenet"), model.safetensors, the tokenizer
and a generation config; after ``import hypenet`` it loads with
``AutoModelForCausalLM.from_pretrained``. The export is checked by loading it back that way and
comparing its logits with the in-memory model's.
"""

from __future__ import annotations

import torch

from .finetune import load_student
from .runtime import Runtime


def source_stage(runtime: Runtime) -> str:
    """The last finished training stage: "finetune" if it finished, else "distill"."""
    for stage in ("finetune", "distill"):
        if runtime.done_summary(stage) is not None:
            return stage
    raise RuntimeError(f"export needs a finished distill or finetune stage in {runtime.out}; run `halo distill` first")


def load_exported(path, device: torch.device, dtype: torch.dtype = torch.float32):
    import hypenet.modeling  # noqa: F401 - registers HypeNet with the transformers Auto classes
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


@torch.no_grad()
def run_export(runtime: Runtime) -> dict:
    stage = source_stage(runtime)
    out = runtime.stage_dir("export")
    summary = {"source": stage, "path": str(out)}
    if runtime.dist.is_main:
        model = load_student(runtime, stage).eval()
        model.save_pretrained(out, safe_serialization=True)
        runtime.tokenizer().save_pretrained(out)
        reloaded = load_exported(out, runtime.device)
        probe = runtime.splits().heldout_stream[: min(64, runtime.splits().heldout_stream.numel())][None]
        probe = probe.to(runtime.device)
        difference = (model(input_ids=probe).logits - reloaded(input_ids=probe).logits).abs().max().item()
        if difference > 1e-4:
            raise RuntimeError(f"export check failed: reloaded logits differ by {difference:.3g}")
        summary.update({"reload_class": type(reloaded).__name__, "reload_max_logit_difference": difference})
    return summary
