"""Evaluation pictures (matplotlib, written atomically): k-shot curves, prototype similarities."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vembed.io import atomic_path

SET_STYLES = {"seen": "-", "unseen": "--"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vembed.fonts import matplotlib_families

    plt.rcParams["font.family"] = list(matplotlib_families())  # class names in any installed script
    return plt


def save_figure(fig, out: str | Path) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)
    return out


def plot_fewshot(reports: Sequence, out: str | Path) -> Path:
    """Top-1 accuracy against k (seen solid, unseen dashed, one colour per model) and, per model,
    the cosine-similarity heat map of up to 8 class prototypes."""
    plt = _pyplot()
    maps = [r for r in reports if r.heatmap]
    fig, axes = plt.subplots(
        1, 1 + len(maps), figsize=(4.6 * (1 + len(maps)), 4.0), constrained_layout=True, squeeze=False
    )
    curve = axes[0][0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, report in enumerate(reports):
        for name, by_k in report.results.items():
            ks = sorted(by_k)
            curve.plot(
                ks,
                [100 * by_k[k].top1 for k in ks],
                SET_STYLES.get(name, ":"),
                marker="o",
                color=colours[i % len(colours)],
                label=f"{_short(report.model)} · {name}",
            )
    curve.set(title="k-shot prototype accuracy", xlabel="k (support images per class)", ylabel="top-1 %")
    curve.grid(alpha=0.3)
    # under the axes, never on the curves (the accuracies at k=1..10 fill the whole panel)
    curve.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    # one colour scale for every model, so "before" and "after" maps compare at a glance
    low = min((v for r in maps for row in r.heatmap["matrix"] for v in row), default=-1.0)
    for ax, report in zip(axes[0][1:], maps, strict=True):
        heat = report.heatmap
        image = ax.imshow(heat["matrix"], vmin=min(low, 0.99), vmax=1, cmap="viridis")
        n = len(heat["classes"])
        ax.set_xticks(range(n), heat["classes"], rotation=90, fontsize="small")
        ax.set_yticks(range(n), heat["classes"], fontsize="small")
        middle = (min(low, 0.99) + 1) / 2
        for r in range(n):
            for c in range(n):
                value = heat["matrix"][r][c]
                colour = "black" if value > middle else "white"
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6, color=colour)
        ax.set_title(
            f"{_short(report.model)}\n{heat['set']} prototypes, k={heat['k']} (cosine)", fontsize="small"
        )
        fig.colorbar(image, ax=ax, shrink=0.8)
    return save_figure(fig, out)


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def plot_confusion(
    labels: Sequence[str], matrix: Sequence[Sequence[int]], out: str | Path, *, title: str = ""
) -> Path:
    """The confusion matrix (rows: true class, columns: predicted), counts and row-normalised colour."""
    import numpy as np

    plt = _pyplot()
    counts = np.asarray(matrix, dtype=float)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(labels)
    size = min(4 + 0.35 * n, 24)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), constrained_layout=True)
    image = ax.imshow(rows, vmin=0, vmax=1, cmap="Blues")
    ticks = [_short(str(label), 18) for label in labels]
    ax.set_xticks(range(n), ticks, rotation=90, fontsize="small")
    ax.set_yticks(range(n), ticks, fontsize="small")
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    if n <= 30:
        for r in range(n):
            for c in range(n):
                if counts[r, c]:
                    colour = "white" if rows[r, c] > 0.5 else "black"
                    ax.text(c, r, f"{int(counts[r, c])}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    return save_figure(fig, out)
