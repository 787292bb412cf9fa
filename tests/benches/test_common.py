"""The benchmark helpers: host time per call, speed-ups against the anchor, the text table and the PNG of the
rows."""

from __future__ import annotations

import pytest

from benches.common import add_speedups, format_table, host_ms, plot_rows


def _rows() -> list[dict]:
    rows = [{"op": "x", "shape": shape, "backend": backend, "pass": pass_, "ms": ms}
            for shape, pass_, backend, ms in [("B1 T8", "fwd", "ours", 1.0), ("B1 T8", "fwd", "anchor", 3.0),
                                              ("B1 T8", "fwd+bwd", "ours", 2.0), ("B2 T8", "fwd", "ours", 4.0),
                                              ("B2 T8", "fwd", "anchor", 2.0)]]
    add_speedups(rows, "anchor")
    return rows


def test_host_time_is_the_mean_time_of_one_call(monkeypatch):
    """On a fake clock that each call advances by 2 ms (no real timing in tests)."""
    clock = [0.0]
    monkeypatch.setattr("benches.common.time.perf_counter", lambda: clock[0])

    def call():
        clock[0] += 0.002

    ms = host_ms(call, iters=10)
    assert clock[0] == pytest.approx(0.022)  # a warm-up call, then the timed ones
    assert ms == pytest.approx(2.0)


def test_speedups_are_anchor_time_over_own_time_within_shape_and_pass():
    rows = _rows()
    assert [r.get("speedup") for r in rows] == [3.0, 1.0, None, 0.5, 1.0]
    assert all(r["anchor"] == "anchor" for r in rows if "speedup" in r)


def test_table_leaves_out_empty_columns_and_blank_cells():
    lines = format_table(_rows()).splitlines()
    assert lines[0].split() == ["op", "shape", "pass", "backend", "ms", "speedup"]
    assert len(lines) == 2 + 5
    assert lines[4].split() == ["x", "B1", "T8", "fwd+bwd", "ours", "2.0000"]  # no speed-up: blank cell


def test_plot_writes_a_png_with_a_panel_per_pass(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "x.png"
    assert plot_rows(_rows(), path, "x on CPU") == f"wrote {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    width, _ = Image.open(path).size
    assert width > 1.5 * 7.5 * 120  # two panels of 7.5 inches at 120 dpi
