"""PNG plots of HALO results (matplotlib is optional: without it each function returns a message)."""

from __future__ import annotations

import itertools
from pathlib import Path


def _save(plt, fig, ax, title: str, path: Path) -> str:
    """Title, light grid, tight layout, PNG at 100 dpi; closes the figure."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib (the "plot" extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def loss_plot(records: list[dict], path: Path, title: str) -> str:
    """Training loss vs optimizer step, from the JSON-lines log records."""
    return loss_curves_plot({"": records}, path, title)


def loss_curves_plot(curves: dict[str, list[dict]], path: Path, title: str) -> str:
    """Several runs' training loss vs optimizer step, one line per label (a legend when labels are given)."""
    plt = pyplot()
    if plt is None:
        return f"matplotlib is not installed; skipped {path.name}"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (label, records), style in zip(curves.items(), itertools.cycle(("-", "--", ":", "-."))):
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], style, label=label or None)
    if any(curves):
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    return _save(plt, fig, ax, title, path)


def layer_importance_plot(importance: list[float], attention_layers: list[int], path: Path, title: str) -> str:
    """Bar chart of importance per layer; the layers kept as attention are highlighted."""
    plt = pyplot()
    if plt is None:
        return f"matplotlib is not installed; skipped {path.name}"
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(importance) + 2), 3.5))
    colors = ["tab:red" if i in attention_layers else "tab:blue" for i in range(len(importance))]
    ax.bar(range(len(importance)), importance, color=colors)
    ax.set_xlabel("layer (red: kept as attention)")
    ax.set_ylabel("importance")
    ax.set_title(title)
    ax.set_xticks(range(len(importance)))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


def length_plot(curves: dict[str, dict[int, float]], path: Path, title: str, ylabel: str,
                unit_interval: bool = False) -> str:
    """A metric vs sequence length (log2 x axis), one line per model."""
    plt = pyplot()
    if plt is None:
        return f"matplotlib is not installed; skipped {path.name}"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in curves.items():
        lengths = sorted(points)
        ax.plot(lengths, [points[n] for n in lengths], marker="o", label=name)
    ax.set_xscale("log", base=2)
    if unit_interval:
        ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


def alpha_plot(losses: dict[float, float], path: Path, title: str) -> str:
    """Held-out LM loss vs the HyPE constant a."""
    plt = pyplot()
    if plt is None:
        return f"matplotlib is not installed; skipped {path.name}"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    grid = sorted(losses)
    ax.plot(grid, [losses[a] for a in grid], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("HyPE a")
    ax.set_ylabel("held-out LM loss")
    return _save(plt, fig, ax, title, path)
