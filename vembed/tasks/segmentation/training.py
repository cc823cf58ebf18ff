"""``train.task: segmentation`` on the task contract (:class:`vembed.tasks.base.Task`).

The loop stays the same (optimiser, schedule, checkpoints, resume, selection, ``final/``); this task
gives it a :class:`~vembed.models.segmenter.Segmenter` with the method applied (lora / frozen / full),
image+mask records, pixel cross-entropy (255 ignored), a step runner whose labels are masks, and a
validator reporting ``miou`` (the selection metric) and ``pixel_accuracy``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vembed.data.images import IGNORE_INDEX
from vembed.data.records import SegRecord, read_records
from vembed.errors import VembedError
from vembed.inference import _without_worker_tracebacks
from vembed.io import atomic_dir
from vembed.models.factory import save_model
from vembed.models.lora import apply_lora, merge_lora
from vembed.models.segmenter import Segmenter, create_segmenter
from vembed.settings import AugmentSettings, Settings
from vembed.tasks.base import TrainParts
from vembed.tasks.segmentation.data import SegEvalTransform, SegmentationImages, SegTrainTransform
from vembed.tasks.segmentation.evaluator import SegEvalOptions, SegmentationEvaluator
from vembed.training.data import EpochLoaders, SeededItems, ShuffledBatchSampler, report_problems
from vembed.training.steps import ModelSteps

# train.augment's segmentation defaults for the keys left null: on, a 0.5-2x zoom crop, hflip 0.5
AUGMENT_DEFAULTS = {"enabled": True, "hflip": 0.5}
SELECT_METRIC = "miou"
METRICS = ("miou", "pixel_accuracy")  # what SegmentationEvaluator reports, each can rank models
LOSS_NAME = "pixel_ce"
# train.* keys that only mean something for retrieval: setting one for segmentation is an error
RETRIEVAL_KEYS = (
    "temperature",
    "learnable_temperature",
    "margin",
    "scale",
    "mining",
    "matryoshka_dims",
    "samples_per_class",
    "categories_per_batch",
    "grad_cache_chunk",
)


def check_segmentation_settings(settings: Settings) -> None:
    """Retrieval-only settings asked for a segmentation run are errors naming the key."""
    s = settings.train
    given = s.model_fields_set
    if "loss" in given and s.loss.strip().lower() not in (LOSS_NAME, "ce", "cross_entropy"):
        raise VembedError(
            f"train.loss={s.loss!r} is a retrieval loss; train.task=segmentation trains with pixel "
            "cross-entropy (leave train.loss unset, or set it to pixel_ce)"
        )
    for key in RETRIEVAL_KEYS:
        if key in given and getattr(s, key) not in (None, False):
            raise VembedError(
                f"train.{key} is a retrieval setting; it does not apply to train.task=segmentation"
            )
    if s.sampler == "pk":
        raise VembedError("train.sampler=pk needs class labels per image; segmentation batches are shuffled")


def select_metric(settings: Settings) -> str:
    """``train.select_metric`` when set, else ``miou``."""
    s = settings.train
    given = getattr(s, "select_metric", None)
    return given if given and "select_metric" in s.model_fields_set else SELECT_METRIC


@dataclass
class MaskRecords:
    """Image/mask records with the class names of their data set."""

    records: list[SegRecord]
    class_names: list[str]
    problems: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_mask_records(
    path: Path, settings: Settings, *, what: str, classes: list[str] | None = None
) -> MaskRecords:
    """Records ``{"image", "mask"}`` and the class names of ``classes.txt`` beside ``path``."""
    from vembed.data.prepare.segmasks import CLASSES, read_class_names

    found = read_records(path, image_root=settings.data.image_root, skip_bad=settings.data.skip_bad)
    if not found.is_segmentation:
        raise VembedError(
            f'{path}: train.task=segmentation needs {what} records {{"image": ..., "mask": ...}} '
            "(`vembed prepare segfolder` writes them)"
        )
    names_file = Path(path).parent / CLASSES
    names = read_class_names(names_file) if names_file.is_file() else None
    if names is None and classes is None:
        raise VembedError(
            f"{names_file}: not found; segmentation needs the class list beside the {what} records "
            "(one name a line, the first naming class 0; `vembed prepare` writes it)"
        )
    if names is not None and classes is not None and len(names) != len(classes):
        raise VembedError(
            f"{names_file}: {len(names)} classes, but the training data has {len(classes)} "
            "(the class count differs between the run and the data)"
        )
    return MaskRecords(found.masks(), names or list(classes), list(found.problems))


def build_segmentation_model(settings: Settings, data: MaskRecords) -> Segmenter:
    """The segmenter (float32 on the CPU; accelerate places it) with ``train.method`` applied."""
    model = settings.model
    dtype = "float32" if model.dtype == "auto" else model.dtype
    segmenter = create_segmenter(
        model.name,
        model,
        num_classes=data.num_classes,
        class_names=data.class_names,
        device="cpu",
        dtype=dtype,
    )
    s = settings.train
    if s.grad_checkpointing and s.method != "frozen":
        from vembed.training.model import _enable_checkpointing

        _enable_checkpointing(segmenter.backbone)
    if s.method in ("lora", "frozen"):
        segmenter.backbone.requires_grad_(False)
    if s.method == "lora":
        apply_lora(segmenter, s.lora)
    return segmenter


class PixelCrossEntropy(nn.Module):
    """Cross-entropy over pixels, 255 ignored; a batch with no labelled pixel gives a zero loss."""

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if not bool((masks != IGNORE_INDEX).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)


class _SeededPairs(SeededItems):
    """Items ``(index, tag)`` → the image/mask pair's transform drawn from ``random.Random(tag)``."""

    images: SegmentationImages

    def __getitem__(self, item):
        index, tag = item
        img, mask = self.images.load(index)
        return self.images.transform(img, mask, random.Random(tag))


def _stack(items):
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])


def seg_loaders(data: MaskRecords, *, segmenter: Segmenter, settings: Settings) -> EpochLoaders:
    """The epoch loaders of the image/mask pairs (workers kept between epochs); each pair's augmentation
    is seeded by ``(seed, epoch, position in the epoch)``, so a resumed run sees the same crops."""
    transform = seg_train_transform(segmenter.spec, settings.train.augment)
    images = SegmentationImages(
        data.records, transform, num_classes=data.num_classes, max_pixels=settings.data.max_image_pixels
    )
    dataset = _SeededPairs(images)
    return EpochLoaders(
        dataset, num_workers=settings.data.num_workers, seed=settings.train.seed, collate_fn=_stack
    )


def seg_train_transform(spec, aug: AugmentSettings):
    """Image+mask training transform from ``train.augment`` (the eval transform when it is off)."""
    aug = aug.with_defaults(**AUGMENT_DEFAULTS)
    if not aug.enabled:
        return _Fixed(SegEvalTransform(spec.image_size, spec.mean, spec.std, spec.interpolation))
    options = aug.transform_options()
    crop = {"crop_scale": options.pop("scale"), "crop_ratio": options.pop("ratio")}
    return SegTrainTransform(spec.image_size, spec.mean, spec.std, spec.interpolation, **crop, **options)


class _Fixed:
    """An eval transform with the training call signature (``train.augment=false``)."""

    def __init__(self, transform: SegEvalTransform):
        self.transform = transform

    def __call__(self, img, mask, generator=None):
        return self.transform(img, mask)


class SegmentationSteps(ModelSteps):
    """Step runner: image batches through the (accelerate-wrapped) segmenter (``module``), masks as labels."""

    module: Segmenter
    data: MaskRecords

    def micro_batches(self, epoch: int, batches: list[list[int]], first: int):
        if self.loaders is None:
            self.loaders = seg_loaders(self.data, segmenter=self.module, settings=self.settings)
        device = self.accelerator.device
        loader = self.loaders.epoch(batches, epoch, first)
        for pixels, masks in _without_worker_tracebacks(loader, keep_workers=True):
            yield pixels.to(device, non_blocking=True), masks.to(device, non_blocking=True)


class SegmentationTask:
    """Everything the loop asks of ``train.task: segmentation``, in the order it asks."""

    name: ClassVar[str] = "segmentation"
    keys: ClassVar[tuple[str, ...]] = ()

    def check(self, settings: Settings) -> None:
        check_segmentation_settings(settings)

    def metrics(self, settings: Settings) -> list[str]:
        return list(METRICS)

    def select_metric(self, settings: Settings) -> str:
        return select_metric(settings)

    def describe(self, settings: Settings) -> str:
        return f"train.task={self.name}"

    def augment(self, settings: Settings) -> AugmentSettings:
        return settings.train.augment.with_defaults(**AUGMENT_DEFAULTS)

    def setup(self, settings: Settings, accelerator, *, show_progress: bool = True) -> TrainParts:
        """The records come first (their class list sizes the decoder), then the model with the method
        applied, on the accelerator's device."""
        acc = accelerator
        data = read_mask_records(settings.data.train, settings, what="training")
        val = None
        if settings.data.val:
            val = read_mask_records(settings.data.val, settings, what="validation", classes=data.class_names)
        report_problems(data, val)
        model = build_segmentation_model(settings, data).to(acc.device)
        loss = PixelCrossEntropy().to(acc.device)
        sampler = ShuffledBatchSampler.for_run(len(data.records), settings.train, acc)
        validator = None
        if val is not None:
            options = SegEvalOptions(
                batch_size=settings.eval.batch_size,
                num_workers=settings.data.num_workers,
                max_pixels=settings.data.max_image_pixels,
            )
            validator = SegmentationEvaluator(
                val.records, options, description="validating", autocast=accelerator.autocast
            )
        runner = SegmentationSteps(acc, model, loss, data, settings)
        return TrainParts(model, data, loss, sampler, runner, validator)

    def save(self, out: Path, parts: TrainParts, training: dict) -> None:
        """``final/``: LoRA merged into the encoder, the decoder and the class names (atomically)."""
        training = {**training, "loss": LOSS_NAME, "task": self.name}
        model = merge_lora(parts.model)
        with atomic_dir(out) as tmp:
            save_model(model, tmp, extra={"training": training}, head=model.head())
