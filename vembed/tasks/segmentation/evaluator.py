"""The segmentation evaluator (mIoU, pixel accuracy; optionally under corruptions) and mask prediction.

At the model's input size (default) every image is resized to ``S x S`` and compared with its mask
resized (nearest) to ``S x S``; with ``full_res`` the original image is covered by overlapping
``S x S`` windows (logits averaged) and compared with the original mask. Corruptions are applied to
the image the model sees (``S x S``, or the original with ``full_res``), seeded per image.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vembed.console import progress, rate_column
from vembed.data.images import load_image, load_mask
from vembed.data.records import SegRecord
from vembed.evaluation.base import EvalResult
from vembed.inference import _without_worker_tracebacks
from vembed.models.segmenter import Segmenter
from vembed.tasks.segmentation.corruptions import SEVERITIES, corrupt
from vembed.tasks.segmentation.data import SegEvalTransform, check_classes, check_pair
from vembed.tasks.segmentation.metrics import ConfusionMatrix, SegmentationMetrics


@dataclass(frozen=True)
class Corruption:
    name: str
    severity: int
    seed: int = 0


@dataclass(frozen=True)
class SegEvalOptions:
    """How a :class:`SegmentationEvaluator` runs (from ``eval.batch_size``, ``data.num_workers`` ...).

    ``corruptions`` (names of :data:`~vembed.tasks.segmentation.corruptions.CORRUPTIONS`) are evaluated
    at every one of ``severities`` after the clean images, seeded with ``seed``.
    """

    batch_size: int = 8
    num_workers: int = 0
    full_res: bool = False
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = SEVERITIES
    seed: int = 0
    max_pixels: int | None = None  # data.max_image_pixels (None: the default limit)


class SegmentationEvaluator:
    """``evaluator(segmenter) -> EvalResult``: mIoU and pixel accuracy of one confusion matrix over the
    records (``miou`` ranks models); with corruptions, ``details["corruptions"]`` maps each name to
    ``{severity: mIoU}``. ``details["metrics"]`` is the full :class:`SegmentationMetrics` (per-class IoU).
    """

    name = "segmentation"
    primary_metric = "miou"
    greater_is_better = True

    def __init__(
        self,
        records: Sequence[SegRecord],
        options: SegEvalOptions = SegEvalOptions(),
        *,
        description: str = "segmenting",
        autocast=None,
    ):
        self.records, self.options = list(records), options
        self.description, self.autocast = description, autocast

    @property
    def metrics(self) -> list[str]:
        return ["miou", "pixel_accuracy"]

    def __call__(self, model: Segmenter, *, show_progress: bool = True) -> EvalResult:
        o = self.options
        run = dict(
            batch_size=o.batch_size,
            num_workers=o.num_workers,
            full_res=o.full_res,
            show_progress=show_progress,
            autocast=self.autocast,
            max_pixels=o.max_pixels,
        )
        clean = evaluate_segmentation(model, self.records, description=self.description, **run)
        corruptions: dict[str, dict[str, float]] = {}
        for name in o.corruptions:
            corruptions[name] = {
                str(severity): evaluate_segmentation(
                    model,
                    self.records,
                    corruption=Corruption(name, severity, o.seed),
                    description=f"{name} {severity}",
                    **run,
                ).miou
                for severity in o.severities
            }
        return EvalResult(
            {"miou": clean.miou, "pixel_accuracy": clean.pixel_accuracy},
            self.primary_metric,
            self.greater_is_better,
            details={
                "metrics": clean,
                "corruptions": corruptions,
                "num_images": len(self.records),
                "image_size": model.spec.image_size,
                "full_res": o.full_res,
            },
        )


class _EvalImages(Dataset):
    """``(pixels, mask)`` at ``S x S``, or the original image (normalised) and mask with ``full_res``."""

    def __init__(
        self, records, transform: SegEvalTransform, num_classes, corruption, full_res, max_pixels=None
    ):
        self.max_pixels = max_pixels
        self.records, self.transform, self.num_classes = list(records), transform, num_classes
        self.corruption, self.full_res = corruption, full_res

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        img = load_image(rec.image, max_pixels=self.max_pixels)
        mask = load_mask(rec.mask, max_pixels=self.max_pixels)
        check_pair(img, mask, rec)
        check_classes(mask, self.num_classes, rec)
        size = self.transform.size
        if self.full_res:
            target = torch.from_numpy(mask.astype(np.int64))
        else:
            img = img.resize((size, size), self.transform.resample)
            small = Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST)
            target = torch.from_numpy(np.asarray(small, dtype=np.int64).copy())
        if self.corruption is not None:
            c = self.corruption
            img = Image.fromarray(
                corrupt(np.asarray(img), c.name, c.severity, seed=c.seed * 1_000_003 + index)
            )
        return self.transform.normalize(img), target


def _stack(items):
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])


def eval_transform(model: Segmenter) -> SegEvalTransform:
    spec = model.spec
    return SegEvalTransform(spec.image_size, spec.mean, spec.std, spec.interpolation)


def evaluate_segmentation(
    model: Segmenter,
    records: Sequence[SegRecord],
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    corruption: Corruption | None = None,
    full_res: bool = False,
    show_progress: bool = True,
    description: str = "segmenting",
    autocast=None,
    max_pixels: int | None = None,
) -> SegmentationMetrics:
    """Metrics of ``model`` on ``records`` from one confusion matrix over all of them."""
    data = _EvalImages(records, eval_transform(model), model.num_classes, corruption, full_res, max_pixels)
    loader = DataLoader(
        data,
        batch_size=1 if full_res else batch_size,
        num_workers=min(num_workers, len(data) // (1 if full_res else batch_size) + 1),
        collate_fn=_stack,
    )
    cm = ConfusionMatrix(model.num_classes)
    done = 0
    with progress(rate_column(), enabled=show_progress) as bar:
        task = bar.add_task(description, total=len(data), visible=show_progress)
        for pixels, masks in _without_worker_tracebacks(loader):
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits = sliding_logits(model, pixels[0]) if full_res else model.predict(pixels)
            cm.update(logits.argmax(1), masks)
            done += len(masks)
            bar.update(task, completed=done)
    return cm.metrics(model.class_names)


def sliding_logits(model: Segmenter, image: torch.Tensor, *, overlap: float = 1 / 3) -> torch.Tensor:
    """Logits ``[1, K, H, W]`` of a normalised image ``[3, H, W]`` of any size: ``S x S`` windows with
    ``overlap``, averaged (an image smaller than a window is zero-padded, i.e. mean colour)."""
    size = model.spec.image_size
    _, h, w = image.shape
    ph, pw = max(h, size), max(w, size)
    padded = F.pad(image, (0, pw - w, 0, ph - h))
    stride = max(1, int(size * (1 - overlap)))
    tops = _starts(ph, size, stride)
    lefts = _starts(pw, size, stride)
    total = torch.zeros(1, model.num_classes, ph, pw)
    count = torch.zeros(1, 1, ph, pw)
    windows = [(t, lft) for t in tops for lft in lefts]
    for i in range(0, len(windows), 8):
        chunk = windows[i : i + 8]
        batch = torch.stack([padded[:, t : t + size, lft : lft + size] for t, lft in chunk])
        logits = model.predict(batch)
        for (t, lft), one in zip(chunk, logits, strict=True):
            total[0, :, t : t + size, lft : lft + size] += one
            count[0, :, t : t + size, lft : lft + size] += 1
    return (total / count)[:, :, :h, :w]


def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    n = math.ceil((length - size) / stride) + 1
    return sorted({min(i * stride, length - size) for i in range(n)})


def predict_mask(model: Segmenter, image: Image.Image, *, full_res: bool = False) -> np.ndarray:
    """``uint8 [H, W]`` class indices at the image's original size."""
    transform = eval_transform(model)
    if full_res:
        logits = sliding_logits(model, transform.normalize(image))
    else:
        logits = model.predict(transform.image(image)[None])
        logits = F.interpolate(
            logits, size=(image.size[1], image.size[0]), mode="bilinear", align_corners=False
        )
    return logits.argmax(1)[0].to(torch.uint8).numpy()
