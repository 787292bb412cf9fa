"""Run one op's benchmark: `python -m benches.run --op NAME [--json PATH] [--quick]`.

Imports `benches.ops.NAME`, calls its `run(quick)`, prints one aligned table and writes the rows as JSON to
PATH (default benches/results/NAME.json) and, when $OUT is set, to $OUT/NAME.json too, each with a bar chart of the
rows beside it (same name, .png; needs matplotlib, the "plot" extra).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
from pathlib import Path

from benches import ops as ops_package
from benches.common import device_description, format_table, plot_rows

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def available_ops() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(ops_package.__path__))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", required=True, choices=available_ops(), help="benchmark module in benches/ops")
    parser.add_argument("--json", type=Path, default=None, help="where to write the rows (default "
                                                                "benches/results/<op>.json)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, for a smoke run")
    args = parser.parse_args(argv)

    device = device_description()
    print(f"# {args.op} on {device}", flush=True)
    rows = importlib.import_module(f"benches.ops.{args.op}").run(quick=args.quick)
    print(format_table(rows), flush=True)

    payload = {"op": args.op, "device": device, "quick": args.quick, "rows": rows}
    targets = [args.json or RESULTS_DIR / f"{args.op}.json"]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / f"{args.op}.json")
    for path in dict.fromkeys(targets):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"# wrote {path}")
        print("# " + plot_rows(rows, path.with_suffix(".png"), f"{args.op} on {device}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
