"""One module per op: `run(quick: bool) -> list[dict]` returns the rows of its table (benches/common.py)."""
