"""``metrics.png``: a run's training loss and validation metrics over steps, drawn from its rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vembed.io import atomic_path

PLOT_FILE = "metrics.png"
_NOT_METRICS = ("step", "epoch")


def validation_metrics(val: Sequence[dict]) -> list[str]:
    """The keys of validation rows that are scores: numbers in [0, 1] in every row that has them
    (``recall@1``, ``map@r``, ``top1``, ``miou`` ... whichever the task's evaluator reports; not the
    step, the epoch or counts such as ``num_images``)."""
    names: dict[str, None] = {}
    for row in val:
        names.update(dict.fromkeys(row))
    names.pop("kind", None)
    keep = []
    for name in names:
        if name in _NOT_METRICS or name.startswith("num_"):
            continue
        values = [row[name] for row in val if name in row]
        if all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1 for v in values):
            keep.append(name)
    return keep


def draw_metrics(rows: Sequence[dict], *, title: str = "", selected: str | None = None):
    """The figure of :func:`plot_metrics` (a matplotlib ``Figure``), or ``None`` with nothing to draw."""
    train = [r for r in rows if r.get("kind") == "train" and "loss" in r]
    val = [r for r in rows if r.get("kind") == "val"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    if train:
        # a marker on every point while there are few, so a single logged step is still a visible dot
        marker = "o" if len(train) <= 30 else None
        loss_ax.plot(
            [r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", marker=marker, ms=3
        )
    loss_ax.set(title="training loss", xlabel="step")
    names = validation_metrics(val)
    for name in names:
        points = [(r["step"], 100 * r[name]) for r in val if name in r]
        chosen = name == selected
        val_ax.plot(
            *zip(*points, strict=True),
            marker="o",
            markersize=4 if chosen else 3,
            linewidth=2.4 if chosen else 1.2,
            label=f"{name} (selects)" if chosen else name,
            zorder=3 if chosen else 2,
        )
    val_ax.set(title="validation", xlabel="step", ylabel="%")
    if names:  # beside the panel, never on top of the curves
        val_ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


def plot_metrics(
    rows: Sequence[dict], out: str | Path, *, title: str = "", selected: str | None = None
) -> Path | None:
    """Draw train loss (left) and every validation score (right: Recall@K / MAP@R, top-1 / top-5,
    mIoU ... as the rows have them; ``selected``, the metric that picks the model, drawn bolder)
    against the step.

    ``rows`` are ``metrics.jsonl`` rows (``kind`` = ``train`` or ``val``). Returns the PNG path, or
    ``None`` when there is nothing to draw.
    """
    fig = draw_metrics(rows, title=title, selected=selected)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
