"""benches.halo_ranks: stage 2 as one process and as two torchrun ranks (gloo, CPU) gives the same losses."""

from __future__ import annotations

import json
import os

import pytest

from benches import halo_ranks


def _records(step_seconds: list[float], tokens_per_step: int) -> list[dict]:
    """Log records as the Trainer writes them: cumulative tokens and tokens/s since the start of the run."""
    records, elapsed = [], 0.0
    for step, seconds in enumerate(step_seconds, start=1):
        elapsed += seconds
        tokens = step * tokens_per_step
        records.append({"step": step, "loss": 1.0 / step, "tokens": tokens, "tokens_per_s": tokens / elapsed})
    return records


def test_throughput_skips_the_slow_first_steps():
    # Step 1 compiles (10 s); every later step takes 0.5 s for 100 tokens: 200 tokens/s.
    records = _records([10.0, 0.5, 0.5, 0.5, 0.5], 100)
    assert halo_ranks.second_half_tokens_per_s(records) == pytest.approx(200.0)
    assert halo_ranks.second_half_tokens_per_s(records[:1]) is None


def test_compare_refuses_logs_of_different_steps():
    with pytest.raises(ValueError, match="different steps"):
        halo_ranks.compare(_records([1.0, 1.0], 10), _records([1.0], 10))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a POSIX process model")
def test_two_ranks_reproduce_the_single_process_losses(tmp_path, tiny_settings):
    # One micro batch of the whole global batch, as the demo settings have: each rank must take half of it.
    tiny_settings["distill"]["micro_batch"] = tiny_settings["distill"]["global_batch"]
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_settings))
    out = tmp_path / "ranks"
    assert halo_ranks.main(["--ranks", "2", "--out", str(out), "--config", str(config)]) == 0
    result = json.loads((out / "halo_ranks.json").read_text())
    assert result["ranks"] == 2 and result["steps"] == tiny_settings["distill"]["steps"]
    assert result["max_rel_loss_diff"] <= 1e-5, result
    assert result["tokens_per_s_one"] > 0 and result["tokens_per_s_ranks"] > 0
    assert (out / "halo_ranks.png").is_file()
    assert (out / "ranks" / "distill" / "done.json").is_file()


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path, tiny_settings, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_settings))
    with pytest.raises(SystemExit):
        halo_ranks.main(["--ranks", "3", "--out", str(tmp_path / "ranks"), "--config", str(config)])
    assert "distill.global_batch=2 must split evenly over --ranks 3" in capsys.readouterr().err
