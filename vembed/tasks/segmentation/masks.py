"""``vembed predict-masks``: a PNG of class indices per image, at the image's original size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vembed.console import progress, rate_column
from vembed.data.images import load_image
from vembed.data.records import ImageRecord
from vembed.errors import VembedError
from vembed.io import write_image
from vembed.models.segmenter import Segmenter
from vembed.tasks.segmentation.evaluator import predict_mask
from vembed.tasks.segmentation.plots import overlay

OVERLAY_SUFFIX = ".overlay.png"


@dataclass
class MaskResult:
    out: Path
    masks: list[Path] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def predict_masks(
    model: Segmenter,
    records: Sequence[ImageRecord],
    out: str | Path,
    *,
    overlays: bool = False,
    full_res: bool = False,
    skip_bad: bool = False,
    show_progress: bool = True,
    max_pixels: int | None = None,
) -> MaskResult:
    """Write ``out/<image stem>.png`` (one channel, class indices) per record, and with ``overlays``
    ``out/<image stem>.overlay.png``; two images with the same stem are an error (before writing)."""
    out = Path(out)
    seen: dict[str, Path] = {}
    for rec in records:
        other = seen.setdefault(rec.image.stem, rec.image)
        if other != rec.image:
            raise VembedError(
                f"{rec.image} and {other} would both be written to {out / (rec.image.stem + '.png')}; "
                "predict them into separate folders"
            )
    result = MaskResult(out)
    with progress(rate_column(), enabled=show_progress) as bar:
        task = bar.add_task("predicting masks", total=len(records), visible=show_progress)
        for rec in records:
            try:
                image = load_image(rec.image, max_pixels=max_pixels)
            except VembedError as exc:
                if not skip_bad:
                    raise
                result.problems.append(str(exc))
                continue
            mask = predict_mask(model, image, full_res=full_res)
            result.masks.append(write_image(out / f"{rec.image.stem}.png", Image.fromarray(mask, "L")))
            if overlays:
                path = out / f"{rec.image.stem}{OVERLAY_SUFFIX}"
                result.overlays.append(write_image(path, overlay(image, mask)))
            bar.advance(task)
    return result
