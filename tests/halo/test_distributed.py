"""Two processes under torchrun (gloo, CPU) train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from halo.config import load_config
from halo.pipeline import run_stage
from halo.runtime import Runtime


def _losses(stage_dir):
    return [json.loads(line)["loss"] for line in (stage_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a POSIX process model")
def test_two_ranks_match_one_process(tmp_path, tiny_settings):
    settings = {**tiny_settings, "output_dir": str(tmp_path / "one")}
    single = Runtime.create(load_config(base=settings), progress=False)
    run_stage(single, "align")
    expected = _losses(single.stage_dir("align"))

    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps({**tiny_settings, "output_dir": str(tmp_path / "two")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "halo.cli", "align", "--config", str(config_path), "--no-progress"],
                   check=True, env=env, cwd=os.getcwd(), timeout=300)
    got = _losses(tmp_path / "two" / "align")
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (got, expected)
    assert (tmp_path / "two" / "align" / "candidates.safetensors").is_file()
    assert json.loads((tmp_path / "two" / "align" / "done.json").read_text())["finished"]
