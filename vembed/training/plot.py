"""``metrics.png``: a run's training loss and validation metrics over steps, drawn from its rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vembed.io import atomic_path

PLOT_FILE = "metrics.png"


def plot_metrics(rows: Sequence[dict], out: str | Path, *, title: str = "") -> Path | None:
    """Draw train loss (left) and validation Recall@K / MAP@R (right) against the step.

    ``rows`` are ``metrics.jsonl`` rows (``kind`` = ``train`` or ``val``). Returns the PNG path, or
    ``None`` when there is nothing to draw.
    """
    train = [r for r in rows if r.get("kind") == "train" and "loss" in r]
    val = [r for r in rows if r.get("kind") == "val"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    if train:
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue")
    loss_ax.set(title="training loss", xlabel="step")
    names = [
        k for k in (val[0] if val else {}) if k.startswith(("recall@", "map@", "miou", "pixel_accuracy"))
    ]
    for name in names:
        points = [(r["step"], 100 * r[name]) for r in val if name in r]
        val_ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
    val_ax.set(title="validation", xlabel="step", ylabel="%")
    if names:
        val_ax.legend(fontsize="small", loc="lower right")
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize="medium")
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
