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
    curve.legend(fontsize="small")
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
