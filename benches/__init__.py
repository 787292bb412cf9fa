"""Benchmarks: `python -m benches.run --op NAME` (see benches/run.py)."""
