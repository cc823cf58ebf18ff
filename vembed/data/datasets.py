"""Datasets and loaders over image records: decoding happens in DataLoader workers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from vembed.data.images import load_image
from vembed.data.records import ImageRecord
from vembed.errors import VembedError


@dataclass(frozen=True)
class BadItem:
    """A record whose image could not be decoded (only produced with ``skip_bad``)."""

    index: int
    message: str


class ImageDataset(Dataset):
    """Records → ``(pixel_values, index)``; with ``skip_bad`` an undecodable image yields a BadItem."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable,
        *,
        skip_bad: bool = False,
        max_pixels: int | None = None,
    ):
        self.records = records
        self.transform = transform
        self.skip_bad = skip_bad
        self.max_pixels = max_pixels  # data.max_image_pixels (None: the default limit)
        self.min_size = getattr(transform, "min_decode_size", None)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return self.load(index, self.transform)

    def load(self, index: int, transform: Callable):
        """Item ``index`` through ``transform`` (e.g. one bound to a seeded generator)."""
        rec = self.records[index]
        try:
            image = load_image(rec.decode_path, min_size=self.min_size, max_pixels=self.max_pixels)
        except VembedError as exc:
            message = f"{rec.source}: {exc}" if rec.source and rec.source != str(rec.image) else str(exc)
            if self.skip_bad:
                return BadItem(index, message)
            raise VembedError(message) from None
        return transform(image), index


@dataclass
class Batch:
    pixel_values: torch.Tensor
    indices: torch.Tensor
    bad: list[BadItem]


def collate(items: list) -> Batch:
    """Stack good items; keep bad ones aside so the caller can count and report them."""
    good = [it for it in items if not isinstance(it, BadItem)]
    bad = [it for it in items if isinstance(it, BadItem)]
    if good:
        pixels = torch.stack([it[0] for it in good])
        indices = torch.tensor([it[1] for it in good], dtype=torch.long)
    else:
        pixels, indices = torch.empty(0), torch.empty(0, dtype=torch.long)
    return Batch(pixels, indices, bad)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    shuffle: bool = False,
    batch_sampler=None,
    drop_last: bool = False,
    seed: int | None = None,
    collate_fn: Callable = collate,
    persistent: bool = False,
) -> DataLoader:
    """A DataLoader with vembed's collate; on CUDA pinned memory (copies overlap with compute).

    Each worker keeps 4 batches decoded ahead. ``persistent`` keeps the workers alive from one
    iteration to the next (training epochs, see :class:`vembed.training.data.EpochLoaders`); a
    one-pass loader (embedding, validation) lets them go when the pass ends.
    """
    kwargs: dict = {
        "num_workers": num_workers,
        "collate_fn": collate_fn,
        "pin_memory": torch.cuda.is_available(),
    }
    if num_workers > 0:
        kwargs.update(persistent_workers=persistent, prefetch_factor=4)
    if seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **kwargs)
