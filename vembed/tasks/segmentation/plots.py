"""Pictures of segmentation results: class colours, overlays, and the ``eval segmentation --plot`` figure
(image / ground truth / prediction panels, and mIoU against severity per corruption)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vembed.data.images import IGNORE_INDEX
from vembed.io import atomic_path


def palette(num_classes: int = 256) -> np.ndarray:
    """``uint8 [256, 3]`` colours (Pascal VOC's bit-interleaved palette; 255 = white)."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours[index] = (r, g, b)
    colours[IGNORE_INDEX] = (255, 255, 255)
    return colours


def colourise(mask: np.ndarray) -> np.ndarray:
    return palette()[mask]


def overlay(image: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with its classes painted over (class 0 and 255 left unpainted)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    colour = colourise(mask).astype(np.float32)
    paint = ((mask != 0) & (mask != IGNORE_INDEX))[..., None]
    out = np.where(paint, (1 - alpha) * base + alpha * colour, base)
    return Image.fromarray(out.round().astype(np.uint8), "RGB")


LEGEND_CLASSES = 24  # at most this many class swatches (the classes seen in the panels first)


def draw_segmentation(
    panels: Sequence[tuple[Image.Image, np.ndarray, np.ndarray]],
    corruptions: dict[str, dict[str, float]] | None = None,
    *,
    title: str = "",
    class_names: Sequence[str] | None = None,
    clean: float | None = None,
):
    """The figure of :func:`plot_segmentation` (a matplotlib ``Figure``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = len(panels)
    extra = 1 if corruptions else 0
    # constrained layout keeps the title, the column headers and the legends off each other
    fig = plt.figure(figsize=(11, 3 * rows + 4 * extra), layout="constrained")
    grid = fig.add_gridspec(rows + extra, 3, height_ratios=[1] * rows + [1.4] * extra)
    for r, (image, truth, pred) in enumerate(panels):
        for c, (picture, label) in enumerate(
            ((image, "image"), (colourise(truth), "ground truth"), (colourise(pred), "prediction"))
        ):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(picture)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(label)
    present = sorted({int(v) for _, t, p in panels for v in (*np.unique(t), *np.unique(p))})
    shown = [i for i in present if i != IGNORE_INDEX][:LEGEND_CLASSES]
    if shown:
        colours = palette() / 255.0
        names = list(class_names or [])
        handles = [
            Patch(facecolor=colours[i], edgecolor="0.4", label=names[i] if i < len(names) else f"class {i}")
            for i in shown
        ]
        if IGNORE_INDEX in present:
            handles.append(Patch(facecolor="white", edgecolor="0.4", label="ignored (255)"))
        fig.legend(handles=handles, loc="outside right upper", fontsize="small", title="classes")
    if corruptions:
        _draw_corruptions(fig.add_subplot(grid[rows, :]), corruptions, clean)
    if title:
        fig.suptitle(title)
    return fig


def _draw_corruptions(ax, corruptions: dict[str, dict[str, float]], clean: float | None) -> None:
    """One bar per corruption when every corruption was measured at one severity; else mIoU against
    severity, one distinct colour per corruption, the legend beside the axes."""
    import matplotlib.pyplot as plt

    severities = sorted({int(s) for values in corruptions.values() for s in values})
    names = list(corruptions)
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[: len(names)] if len(names) <= 20 else None
    if len(severities) == 1:
        (severity,) = severities
        values = [100 * corruptions[name].get(str(severity), float("nan")) for name in names]
        bars = ax.bar(range(len(names)), values, color="tab:blue")
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize="small")
        ax.set_title(f"mIoU under each corruption at severity {severity}", fontsize="medium")
    else:
        for i, name in enumerate(names):
            values = corruptions[name]
            steps = sorted(values, key=int)
            ax.plot(
                [int(s) for s in steps],
                [100 * values[s] for s in steps],
                marker="o",
                label=name,
                color=None if colours is None else colours[i],
            )
        ax.set_xlabel("severity")
        ax.set_xticks(severities)
        ax.set_title("mIoU against corruption severity", fontsize="medium")
    if clean is not None:
        ax.axhline(100 * clean, color="0.3", linestyle="--", linewidth=1, label=f"clean {100 * clean:.1f}")
    if len(severities) > 1 or clean is not None:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, axis="y" if len(severities) == 1 else "both")


def plot_segmentation(
    out: str | Path,
    panels: Sequence[tuple[Image.Image, np.ndarray, np.ndarray]],
    corruptions: dict[str, dict[str, float]] | None = None,
    *,
    title: str = "",
    class_names: Sequence[str] | None = None,
    clean: float | None = None,
) -> Path:
    """Rows of (image, ground truth, prediction) with a legend of the class colours, plus the mIoU
    under each corruption if given (bars at one severity, curves over several; ``clean``: a line)."""
    import matplotlib.pyplot as plt

    fig = draw_segmentation(panels, corruptions, title=title, class_names=class_names, clean=clean)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


def plot_report(
    out: str | Path,
    model,
    records: Sequence,
    corruptions: dict[str, dict[str, float]] | None = None,
    *,
    title: str = "",
    clean: float | None = None,
) -> Path:
    """Predict ``records`` (image/mask records) with ``model`` and draw :func:`plot_segmentation`."""
    from vembed.data.images import load_image, load_mask
    from vembed.tasks.segmentation.evaluator import predict_mask

    panels = []
    for rec in records:
        image = load_image(rec.image)
        panels.append((image, load_mask(rec.mask), predict_mask(model, image)))
    return plot_segmentation(
        out,
        panels,
        corruptions or None,
        title=title,
        class_names=getattr(model, "class_names", None),
        clean=clean,
    )
