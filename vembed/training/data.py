"""Training and validation data: records → labels, the batch sampler, and deterministic epoch loaders.

The batches of an epoch are a pure function of ``(seed, epoch)`` (P x K or shuffled), and each image's
augmentation is seeded by ``(seed, epoch, position in the epoch)``, so a run resumed mid-epoch by
skipping its first batches sees exactly the images and crops an uninterrupted run would have seen,
whatever the number of DataLoader workers.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from vembed.console import log
from vembed.data.datasets import ImageDataset, build_loader
from vembed.data.images import EvalTransform, TrainTransform
from vembed.data.records import ImageRecord, RecordSet, label_codes, read_records
from vembed.data.samplers import PKBatchSampler
from vembed.errors import VembedError
from vembed.losses import loss_class
from vembed.models.registry import ModelSpec
from vembed.settings import Settings, TrainSettings

# train.augment's retrieval defaults for the keys left null: off; switched on, crops of 90-100 % of the
# image and no flips (the better augmentation on both small sets measured, docs/training.md)
AUGMENT_DEFAULTS = {"enabled": False, "scale": (0.9, 1.0), "hflip": 0.0}


@dataclass
class LabelledImages:
    """Image records with dense integer labels (pairs become two images sharing one label)."""

    records: list[ImageRecord]
    labels: list[int]
    class_names: list
    categories: list[int] | None = None  # dense category id per record, when every record has one
    is_pairs: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, keep: Sequence[int]) -> LabelledImages:
        """The records at positions ``keep`` (labels re-coded densely)."""
        records = [self.records[i] for i in keep]
        codes, names = label_codes([self.class_names[self.labels[i]] for i in keep])
        categories = [self.categories[i] for i in keep] if self.categories is not None else None
        return LabelledImages(records, codes, names, categories, self.is_pairs, self.problems)


def read_labelled(path: Path, settings: Settings, *, what: str) -> LabelledImages:
    """Read a records file for training or validation; every image record needs a label."""
    record_set: RecordSet = read_records(
        path, image_root=settings.data.image_root, skip_bad=settings.data.skip_bad
    )
    images = record_set.images()
    for rec in images:
        if rec.label is None:
            raise VembedError(
                f"{rec.source or rec.image}: missing field 'label' ({what} records need a class label, "
                "or use query_image/positive pair records)"
            )
    labels, names = label_codes([rec.label for rec in images])
    categories = None
    if all(rec.category is not None for rec in images):
        categories, _ = label_codes([rec.category for rec in images])
    return LabelledImages(images, labels, names, categories, record_set.is_pairs, record_set.problems)


def uses_pk(data: LabelledImages, settings: TrainSettings) -> bool:
    if settings.sampler != "auto":
        return settings.sampler == "pk"
    return data.is_pairs or loss_class(settings.loss).batches != "any"  # positives in each batch


def samples_per_class(data: LabelledImages, settings: TrainSettings) -> int:
    if settings.samples_per_class is not None:
        return settings.samples_per_class
    return 2 if data.is_pairs or loss_class(settings.loss).batches == "pairs" else 4


class ShuffledBatchSampler:
    """Batches of a seeded permutation (torch's DistributedSampler), a pure function of (seed, epoch)."""

    def __init__(self, size: int, batch_size: int, *, seed: int, num_replicas: int = 1, rank: int = 0):
        if size // num_replicas < batch_size:
            raise VembedError(
                f"the training set has {size} images, fewer than one batch of train.batch_size={batch_size}"
                + (f" per process ({num_replicas} processes)" if num_replicas > 1 else "")
            )
        self.sampler = DistributedSampler(
            range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batches = BatchSampler(self.sampler, batch_size, drop_last=True)

    @classmethod
    def for_run(cls, size: int, settings: TrainSettings, accelerator) -> ShuffledBatchSampler:
        """``train.batch_size`` per process, ``train.seed``, this process' share under ``accelerator``."""
        return cls(
            size,
            settings.batch_size,
            seed=settings.seed,
            num_replicas=accelerator.num_processes,
            rank=accelerator.process_index,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def build_batch_sampler(
    data: LabelledImages, settings: TrainSettings, *, num_replicas: int = 1, rank: int = 0
) -> PKBatchSampler | ShuffledBatchSampler:
    """P x K class-balanced batches (optionally few categories per batch), or shuffled batches."""
    if not uses_pk(data, settings):
        for key in ("categories_per_batch", "hard_negatives"):
            if getattr(settings, key):
                raise VembedError(f"train.{key} needs P x K batches (train.sampler=pk)")
        return ShuffledBatchSampler(
            len(data.records), settings.batch_size, seed=settings.seed, num_replicas=num_replicas, rank=rank
        )
    k = samples_per_class(data, settings)
    if settings.batch_size % k:
        raise VembedError(
            f"train.batch_size={settings.batch_size} must be a multiple of train.samples_per_class={k} "
            "(P classes x K images per batch)"
        )
    negatives = hard_negatives = None
    if settings.hard_negatives:
        negatives, hard_negatives = (
            mined_negatives(data, settings, say=log if rank == 0 else None),
            settings.hard_negatives,
        )
    categories = None
    if settings.categories_per_batch is not None:
        if data.categories is None:
            missing = next(rec for rec in data.records if rec.category is None)
            raise VembedError(
                f"train.categories_per_batch is set but {missing.source or missing.image} has no 'category'"
            )
        categories = data.categories
    counts = Counter(data.labels)
    singles = [label for label, n in counts.items() if n < 2]
    say = log if rank == 0 else (lambda message: None)
    if singles:
        say(
            f"[yellow]note:[/] {len(singles)} of {len(counts)} classes have a single image; P x K batches "
            f"need two images of a class, so these {len(singles)} images are not trained on "
            f"(e.g. class {data.class_names[singles[0]]!r})"
        )
    p = settings.batch_size // k
    if categories is None:
        p, k = fit_pk(settings.batch_size, k, len(counts) - len(singles), say=say)
    return PKBatchSampler(
        data.labels,
        p,
        k,
        categories=categories,
        categories_per_batch=settings.categories_per_batch,
        negatives=negatives,
        hard_negatives=hard_negatives,
        seed=settings.seed,
        num_replicas=num_replicas,
        rank=rank,
    )


def mined_negatives(data: LabelledImages, settings: TrainSettings, *, say=None) -> list[list[int]]:
    """``train.hard_negatives``: the records' ``negatives`` as dataset indices (said once by ``say``)."""
    from vembed.mining import negative_indices

    # records skipped as bad (data.skip_bad) may be some records' negatives: those are passed over
    negatives = negative_indices(data.records, skip_unknown=bool(data.problems))
    if negatives is None:
        first = data.records[0]
        raise VembedError(
            f"train.hard_negatives={settings.hard_negatives} but the training records "
            f"({first.source.rsplit(':', 1)[0] or first.image}) have no 'negatives': mine them first, "
            "`vembed mine --model MODEL --data TRAIN.jsonl --out MINED.jsonl`, and train on MINED.jsonl"
        )
    if say is not None:
        carrying = sum(1 for row in negatives if row)
        say(
            f"hard negatives: each class a batch draws brings up to {settings.hard_negatives} classes of its "
            f"anchor's mined negatives ({carrying} of {len(negatives)} records carry negatives, "
            f"{sum(map(len, negatives)) / len(negatives):.1f} per record)"
        )
    return negatives


def fit_pk(batch_size: int, k: int, num_classes: int, *, say=log) -> tuple[int, int]:
    """``(P, K)`` for a batch of ``batch_size`` when only ``num_classes`` classes have two images or more.

    With enough classes this is ``(batch_size // k, k)``. With fewer, K is raised to the smallest
    divisor of the batch size that needs at most ``num_classes`` classes; when no divisor fits, all
    classes share the batch (``batch_size // num_classes`` images each). Either way it is said once.
    """
    wanted = batch_size // k
    if num_classes >= wanted:
        return wanted, k
    if num_classes < 2:
        raise VembedError(
            f"P x K batches need at least 2 classes with 2 images or more; the training set has {num_classes}"
        )
    fitting = [
        d for d in range(k, batch_size // 2 + 1) if batch_size % d == 0 and batch_size // d <= num_classes
    ]
    new_k = fitting[0] if fitting else batch_size // num_classes
    p = batch_size // new_k if fitting else num_classes
    size = "" if p * new_k == batch_size else f"; batches of {p * new_k} images instead of {batch_size}"
    say(
        f"[yellow]note:[/] {num_classes} classes (with 2 images or more) cannot fill {wanted} classes x "
        f"{k} images per batch: using {p} classes x {new_k} images (train.samples_per_class={new_k}){size}"
    )
    return p, new_k


def epoch_batches(sampler, epoch: int) -> list[list[int]]:
    """The batches of ``epoch`` (a list, so a resumed run can skip the ones already trained on)."""
    sampler.set_epoch(epoch)
    return [list(batch) for batch in sampler]


class SeededItems(Dataset):
    """A dataset of ``images`` whose items are ``(index, tag)``: each draws its random augmentation from
    ``random.Random(tag)`` (tag = seed/epoch/position, see :class:`EpochLoaders`), so the crop does not
    depend on worker count or on resuming, and no global generator is touched."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)


class AugmentedImages(SeededItems):
    """An :class:`ImageDataset` whose random augmentation is seeded per draw."""

    images: ImageDataset

    def __getitem__(self, item):
        index, tag = item
        transform = self.images.transform
        if not getattr(transform, "takes_generator", False):
            return self.images[index]
        generator = random.Random(tag)
        return self.images.load(index, lambda image: transform(image, generator))


def train_transform(spec: ModelSpec, settings: TrainSettings):
    """The training images' transform from ``train.augment`` (the eval transform when it is off)."""
    aug = settings.augment.with_defaults(**AUGMENT_DEFAULTS)
    if not aug.enabled:
        return EvalTransform(spec)
    return TrainTransform(spec, **aug.transform_options())


def tag_batches(batches: list[list[int]], seed: int, epoch: int) -> list[list[tuple[int, str]]]:
    """Each index with its augmentation seed ``seed/epoch/position in the epoch`` (whatever the batch size)."""
    tagged, drawn = [], 0
    for batch in batches:
        tagged.append([(index, f"{seed}/{epoch}/{drawn + slot}") for slot, index in enumerate(batch)])
        drawn += len(batch)
    return tagged


class _CurrentBatches:
    """The batch sampler of :class:`EpochLoaders`: the tagged batches of the epoch being read."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class EpochLoaders:
    """One DataLoader for every epoch of a run, its workers kept alive from epoch to epoch.

    Each epoch only sets the ``(index, tag)`` batches the workers read; an item's augmentation is drawn
    from its tag (seed/epoch/position), never from a worker's state, so an epoch's images and crops are
    the same with persistent workers, with new ones or with none, and after a resume. :meth:`close`
    stops the workers (the training loop calls it when the run ends).
    """

    def __init__(self, dataset: Dataset, *, num_workers: int, seed: int, collate_fn=None):
        self.seed = seed
        self.current = _CurrentBatches()
        extra = {"collate_fn": collate_fn} if collate_fn is not None else {}
        self.loader = build_loader(
            dataset,
            batch_sampler=self.current,
            num_workers=num_workers,
            seed=seed * 1000,
            persistent=True,
            **extra,
        )

    def epoch(self, batches: list[list[int]], epoch: int, first: int = 0) -> DataLoader:
        """The loader over ``batches[first:]`` of ``epoch`` (the same DataLoader every epoch)."""
        self.current.batches = tag_batches(batches, self.seed, epoch)[first:]
        return self.loader

    def close(self) -> None:
        iterator = getattr(self.loader, "_iterator", None)  # set once persistent workers have started
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.loader._iterator = None


def train_loaders(
    records: Sequence[ImageRecord],
    *,
    spec: ModelSpec,
    settings: Settings,
    items: Callable[[ImageDataset], Dataset] = AugmentedImages,
) -> EpochLoaders:
    """The epoch loaders of the training images, decoding and augmenting in ``data.num_workers`` workers.

    ``items`` makes what a batch holds of the images (one image each; the re-ranker: pairs of them).
    """
    images = ImageDataset(
        records,
        train_transform(spec, settings.train),
        skip_bad=settings.data.skip_bad,
        max_pixels=settings.data.max_image_pixels,
    )
    return EpochLoaders(items(images), num_workers=settings.data.num_workers, seed=settings.train.seed)


def report_problems(data, val) -> None:
    """One line per data set with records that were skipped (``data.skip_bad``)."""
    for what, found in (("training", data), ("validation", val)):
        if found is not None and found.problems:
            log(f"[yellow]skipped {len(found.problems)} bad {what} records[/] (first: {found.problems[0]})")
