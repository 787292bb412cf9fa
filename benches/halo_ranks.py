"""HALO stage 2 as one process and as G data-parallel ranks: the same loss curve, and the throughput of each.

    python -m benches.halo_ranks [--ranks 2] [--out DIR] [--config run.json] [key=value ...]

Starts from the settings of `halo demo` (halo.demo.DEMO_SETTINGS; --config and key=value override them, e.g.
device=cuda distill.steps=200). Runs `halo align` and `halo select` once, then `halo distill` twice from that same
selection, with the same global batch: as one process (DIR/one) and under `torchrun --standalone
--nproc_per_node G` (DIR/ranks), each exactly as a user would run the command (the ranks run with
distill.micro_batch = gcd(micro_batch, global_batch / G), so that every rank's share splits into micro batches). Then compares the per-step losses
of the two runs (largest absolute and relative difference) and their throughput over the second half of the steps
(so that kernel compilation in the first steps does not count), and writes DIR/halo_ranks.json and
DIR/halo_ranks.png (both loss curves). On CPUs the ranks talk through gloo, on GPUs through NCCL, one GPU a rank.
Differences are reported, never asserted: fp32 on CPUs agrees to rounding, bf16 on GPUs to bf16 noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from halo.config import build_config, deep_merge
from halo.demo import DEMO_SETTINGS
from halo.plots import loss_curves_plot
from halo.train import read_log

RUNS = ("one", "ranks")


def halo_command(stage: str, config_path: Path, output_dir: Path, overrides: list[str], ranks: int = 1,
                 force: bool = False) -> list[str]:
    """The command line of one `halo` stage, under torchrun when ranks > 1."""
    launcher = [sys.executable, "-m"]
    if ranks > 1:
        launcher += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m"]
    flags = ["--config", str(config_path), "--no-progress"] + (["--force"] if force else [])
    return [*launcher, "halo.cli", stage, *flags, *overrides, f"output_dir={output_dir}"]


def run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # CPU ranks share the cores: one thread each keeps them from fighting
    subprocess.run(command, check=True, env=env)


def second_half_tokens_per_s(records: list[dict]) -> Optional[float]:
    """Tokens per second between the middle and the last logged step, from the cumulative counters the Trainer
    logs (tokens so far, and tokens per second since the run started)."""
    if len(records) < 2:
        return None
    middle, last = records[(len(records) - 1) // 2], records[-1]
    elapsed = [r["tokens"] / r["tokens_per_s"] for r in (middle, last)]
    if elapsed[1] <= elapsed[0]:
        return None
    return (last["tokens"] - middle["tokens"]) / (elapsed[1] - elapsed[0])


def compare(one: list[dict], ranks: list[dict]) -> dict:
    """Per-step loss differences of two logs of the same steps, and the throughput of each."""
    if [r["step"] for r in one] != [r["step"] for r in ranks]:
        raise ValueError(f"the two runs logged different steps: {[r['step'] for r in one]} vs "
                         f"{[r['step'] for r in ranks]}")
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(one, ranks)]
    rel = [d / max(abs(a["loss"]), 1e-12) for d, a in zip(diffs, one)]
    speed = {name: second_half_tokens_per_s(records) for name, records in zip(RUNS, (one, ranks))}
    ratio = speed["ranks"] / speed["one"] if speed["one"] and speed["ranks"] else None
    return {"steps": len(one), "max_abs_loss_diff": max(diffs), "max_rel_loss_diff": max(rel),
            "final_loss_one": one[-1]["loss"], "final_loss_ranks": ranks[-1]["loss"],
            "tokens_per_s_one": speed["one"], "tokens_per_s_ranks": speed["ranks"], "speedup": ratio}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="processes of the data-parallel run (>= 2)")
    parser.add_argument("--out", type=Path, default=Path("halo_runs/ranks"), help="output folder")
    parser.add_argument("--config", type=Path, default=None, help="JSON config merged over the demo settings")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. device=cuda distill.steps=200")
    args = parser.parse_args(argv)
    if args.ranks < 2:
        parser.error(f"--ranks must be >= 2, got {args.ranks}")

    settings = copy.deepcopy(DEMO_SETTINGS)
    if args.config is not None:
        deep_merge(settings, json.loads(args.config.read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    config_path = args.out / "settings.json"
    config_path.write_text(json.dumps(settings, indent=2) + "\n")
    dirs = {name: args.out / name for name in RUNS}

    # The same global batch on every run: each rank takes global_batch / ranks rows per step, in micro batches that
    # divide them (the one-process run keeps the configured micro batch).
    distill = build_config(settings, args.overrides).distill
    if distill.global_batch % args.ranks:
        parser.error(f"distill.global_batch={distill.global_batch} must split evenly over --ranks {args.ranks}")
    rank_micro_batch = math.gcd(distill.micro_batch, distill.global_batch // args.ranks)
    rank_overrides = [*args.overrides, f"distill.micro_batch={rank_micro_batch}"]

    for stage in ("align", "select"):
        run(halo_command(stage, config_path, dirs["one"], args.overrides))
    shutil.rmtree(dirs["ranks"], ignore_errors=True)
    shutil.copytree(dirs["one"], dirs["ranks"], ignore=shutil.ignore_patterns("distill"))
    run(halo_command("distill", config_path, dirs["one"], args.overrides, force=True))
    run(halo_command("distill", config_path, dirs["ranks"], rank_overrides, ranks=args.ranks, force=True))

    logs = {name: read_log(dirs[name] / "distill" / "log.jsonl") for name in RUNS}
    result = {"ranks": args.ranks, "overrides": args.overrides, **compare(logs["one"], logs["ranks"])}
    (args.out / "halo_ranks.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    curves = {"1 process": logs["one"], f"{args.ranks} ranks (torchrun)": logs["ranks"]}
    print("# " + loss_curves_plot(curves, args.out / "halo_ranks.png", "HALO stage 2 (distill): one process vs ranks"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
