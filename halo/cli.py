"""The `halo` command: HALO distillation of a Qwen3 Transformer into HypeNet.

    halo align    --config run.json [key=value ...]   stage 1: train a Lightning candidate per layer
    halo select   --config run.json                    choose the layers that stay attention
    halo distill  --config run.json                    stage 2: KL distillation of the hybrid student
    halo finetune --config run.json                    stage 3: long-context next-token finetuning
    halo export   --config run.json                    write the HF checkpoint (output_dir/export)
    halo alpha    --config run.json                    choose HyPE a, write it into the export
    halo run      --config run.json                    all of the above in order, then the report
    halo demo     [--out DIR] [key=value ...]          the whole pipeline on the shipped tiny teacher

Each stage resumes from its last checkpoint and is skipped once done (--force reruns it).
Several GPUs: `torchrun --standalone --nproc_per_node N -m halo.cli distill --config run.json`.
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .runtime import STAGES
from .train import NonFiniteLossError


STAGE_HELP = {
    "align": "stage 1: train a Lightning candidate per layer to match its attention",
    "select": "score each layer's replacement and choose the layers that stay attention",
    "distill": "stage 2: KL distillation of the hybrid student from the teacher",
    "finetune": "stage 3: long-context next-token finetuning of the student",
    "export": "write the student as a Hugging Face checkpoint (output_dir/export)",
    "alpha": "choose the HyPE constant a and write it into the export",
    "run": "every stage in order, then the evaluation report",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="halo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", required=True)
    for name in (*STAGES, "run"):
        stage = sub.add_parser(name, help=STAGE_HELP[name])
        stage.add_argument("--config", help="JSON config file (fields of halo.config.HaloConfig)")
        stage.add_argument("--force", action="store_true", help="delete the stage output(s) and run from scratch")
        stage.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
        stage.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. distill.steps=100 device=cpu")
    demo = sub.add_parser("demo", help="convert the shipped tiny teacher end to end and print the report")
    demo.add_argument("--out", default=None, help="output folder (default ./halo_runs/demo)")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.out, args.overrides, progress=not args.no_progress)
            return 0
        config = load_config(args.config, args.overrides)
        from .pipeline import run_all, run_stage
        from .runtime import Runtime

        runtime = Runtime.create(config, progress=not args.no_progress)
        if args.command == "run":
            run_all(runtime, force=args.force)
        else:
            run_stage(runtime, args.command, force=args.force)
        return 0
    except ConfigError as error:
        print(f"halo: config error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"halo: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
