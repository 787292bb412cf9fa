"""The stages in order, each skipped when its done.json exists (and resumed from its checkpoint
when it stopped part-way), plus the final evaluation report."""

from __future__ import annotations

import json
import time

from .runtime import STAGES, Runtime


def _selected_layout(runtime: Runtime) -> list[str]:
    summary = runtime.done_summary("select")
    if summary is None:
        raise RuntimeError(f"distill needs the layer selection in {runtime.stage_dir('select')}; run `halo select`")
    return summary["mixer_types"]


def _require_done(runtime: Runtime, stage: str, needed_by: str) -> None:
    if runtime.done_summary(stage) is None:
        raise RuntimeError(f"{needed_by} needs a finished {stage} stage in {runtime.stage_dir(stage)}; "
                           f"run `halo {stage}` first")


def run_stage(runtime: Runtime, stage: str, force: bool = False) -> dict:
    """Run one stage (or return the summary of its finished run); returns the stage summary."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if force:
        runtime.reset_stage(stage)
    done = runtime.done_summary(stage)
    if done is not None:
        runtime.log(f"[{stage}] already done ({runtime.stage_dir(stage) / 'done.json'}); --force reruns it")
        return done
    start = time.perf_counter()
    if stage == "align":
        from .align import run_align

        summary = run_align(runtime)
    elif stage == "select":
        from .align import load_candidates
        from .select import run_select

        _require_done(runtime, "align", "select")
        summary = run_select(runtime, load_candidates(runtime))
    elif stage == "distill":
        from .align import load_candidates
        from .distill import run_distill

        _require_done(runtime, "align", "distill")
        summary = run_distill(runtime, _selected_layout(runtime), load_candidates(runtime))
    elif stage == "finetune":
        from .finetune import run_finetune

        _require_done(runtime, "distill", "finetune")
        summary = run_finetune(runtime)
    elif stage == "export":
        from .export import run_export

        summary = run_export(runtime)
    else:
        from .alpha import run_alpha

        _require_done(runtime, "export", "alpha")
        summary = run_alpha(runtime)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    if summary.get("finished", True):
        runtime.mark_done(stage, summary)
    else:
        runtime.log(f"[{stage}] stopped at step {summary['steps']} (stop_after); run it again to resume")
    return summary


def run_all(runtime: Runtime, force: bool = False) -> dict:
    """Every stage in order, then the evaluation report; stops after a stage that did not finish."""
    summaries = {}
    for stage in STAGES:
        summaries[stage] = run_stage(runtime, stage, force=force)
        if not summaries[stage].get("finished", True):
            return summaries
    from .report import write_report

    summaries["report"] = write_report(runtime, summaries)
    if runtime.dist.is_main:
        (runtime.out / "summary.json").write_text(json.dumps(summaries, indent=2, default=str) + "\n")
    return summaries
