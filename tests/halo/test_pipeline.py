"""Every stage runs end to end on a tiny random teacher; the export loads with from_pretrained."""

from __future__ import annotations

import json

import torch

from halo.config import load_config
from halo.pipeline import run_all, run_stage
from halo.runtime import Runtime


def test_every_stage_runs_and_the_export_loads(tiny_settings):
    runtime = Runtime.create(load_config(base=tiny_settings), progress=False)
    summaries = run_all(runtime)
    out = runtime.out

    align = summaries["align"]
    assert align["finished"] and align["steps"] == 3 and set(align["final_layer_mse"]) == {
        f"mse_layer_{i}" for i in range(4)}
    select = json.loads((out / "select" / "scores.json").read_text())
    assert len(select["attention_layers"]) == 1  # floor(4 / 4)
    assert select["mixer_types"].count("attn") == 1 and len(select["mixer_types"]) == 4
    for stage in ("align", "distill", "finetune"):
        log = [json.loads(line) for line in (out / stage / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(1, summaries[stage]["steps"] + 1))
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert summaries["distill"]["first_loss"] > 0  # a KL between two different models

    import hypenet.modeling  # noqa: F401 - registers the Auto classes
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "export")
    assert type(exported).__name__ == "HypeNetForCausalLM"
    assert exported.config.mixer_types == select["mixer_types"]
    alpha = json.loads((out / "alpha" / "alpha.json").read_text())
    assert exported.config.attn_logits_scaling == alpha["attn_logits_scaling"]
    assert alpha["alpha"] in (10.0, 100.0)
    with torch.no_grad():
        logits = exported(input_ids=torch.arange(10)[None]).logits
    assert logits.shape == (1, 10, exported.config.vocab_size) and torch.isfinite(logits).all()

    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"teacher", f"student ({alpha['attn_logits_scaling']})", "student (no scaling)"}
    assert set(report["teacher"]["passkey"]) == {"64", "128"}
    assert "Layer selection" in (out / "report.md").read_text()

    # A finished stage is skipped, and its summary comes back unchanged.
    assert run_stage(runtime, "distill")["final_loss"] == summaries["distill"]["final_loss"]
