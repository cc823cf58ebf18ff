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


def plot_segmentation(
    out: str | Path,
    panels: Sequence[tuple[Image.Image, np.ndarray, np.ndarray]],
    corruptions: dict[str, dict[str, float]] | None = None,
    *,
    title: str = "",
) -> Path:
    """Rows of (image, ground truth, prediction), plus mIoU vs severity per corruption if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(panels)
    extra = 1 if corruptions else 0
    fig = plt.figure(figsize=(9, 3 * rows + 4 * extra))
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
    if corruptions:
        ax = fig.add_subplot(grid[rows, :])
        for name, values in corruptions.items():
            severities = sorted(values, key=int)
            ax.plot(
                [int(s) for s in severities], [100 * values[s] for s in severities], marker="o", label=name
            )
        ax.set_xlabel("severity")
        ax.set_ylabel("mIoU (%)")
        ax.set_xticks(range(1, 6))
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, ncol=3)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
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
) -> Path:
    """Predict ``records`` (image/mask records) with ``model`` and draw :func:`plot_segmentation`."""
    from vembed.data.images import load_image, load_mask
    from vembed.tasks.segmentation.evaluator import predict_mask

    panels = []
    for rec in records:
        image = load_image(rec.image)
        panels.append((image, load_mask(rec.mask), predict_mask(model, image)))
    return plot_segmentation(out, panels, corruptions or None, title=title)
