"""Segmentation metrics from one confusion matrix accumulated over a whole split.

mIoU, pixel accuracy and per-class IoU are computed from the summed matrix (not averaged per image);
pixels labelled ``ignore_index`` (255) are left out, and a class absent from both the ground truth
and the predictions has no IoU (``None``) and is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vembed.evaluation.base import report_json

IGNORE_INDEX = 255


class ConfusionMatrix:
    """``[num_classes, num_classes]`` counts, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: integer tensors of the same shape (any), ``target`` may hold ``ignore_index``.

        Target values outside ``[0, num_classes)`` other than the ignore index are an error.
        """
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
        pred = prediction.reshape(-1).long().cpu()
        true = target.reshape(-1).long().cpu()
        keep = true != self.ignore_index
        pred, true = pred[keep], true[keep]
        if true.numel() and (int(true.min()) < 0 or int(true.max()) >= self.num_classes):
            raise ValueError(f"target holds class {int(true.max())} but there are {self.num_classes} classes")
        pred = pred.clamp(0, self.num_classes - 1)
        counts = torch.bincount(true * self.num_classes + pred, minlength=self.num_classes**2)
        self.matrix += counts.view(self.num_classes, self.num_classes)

    def merge(self, other: ConfusionMatrix) -> None:
        self.matrix += other.matrix

    def metrics(self, class_names: Sequence[str] | None = None) -> SegmentationMetrics:
        return segmentation_metrics(self.matrix, class_names)


@dataclass
class SegmentationMetrics:
    """``miou`` and ``pixel_accuracy`` as fractions (0-1, like every vembed metric; tables show percent);
    ``per_class_iou``: name → IoU, or None for a class absent from ground truth and prediction."""

    miou: float
    pixel_accuracy: float
    per_class_iou: dict[str, float | None]
    pixels: int
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return report_json(self, merged=("extra",))


def segmentation_metrics(
    matrix: torch.Tensor, class_names: Sequence[str] | None = None
) -> SegmentationMetrics:
    """Metrics of a confusion matrix (rows ground truth, columns prediction)."""
    matrix = matrix.to(torch.float64)
    n = matrix.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for a {n}-class confusion matrix")
    tp = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    total = float(matrix.sum())
    miou = float(iou[present].mean()) if bool(present.any()) else 0.0
    return SegmentationMetrics(
        miou=miou,
        pixel_accuracy=float(tp.sum()) / total if total else 0.0,
        per_class_iou={name: (float(iou[i]) if bool(present[i]) else None) for i, name in enumerate(names)},
        pixels=int(total),
    )
