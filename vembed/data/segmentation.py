"""Segmentation data: image + mask transforms that keep them aligned, and the dataset of mask records.

Images are resized with the model's interpolation, masks with nearest neighbour only (a mask pixel
is always one of the classes or 255). The input size is any multiple of the patch size.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vembed.data.images import IGNORE_INDEX, Normalize, load_image, load_mask
from vembed.data.records import SegRecord
from vembed.errors import VembedError

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def fit_to_patch(size: int, patch_size: int) -> int:
    """The nearest multiple of ``patch_size`` (at least one patch)."""
    return max(patch_size, round(size / patch_size) * patch_size)


def check_pair(img: Image.Image, mask: np.ndarray, rec: SegRecord) -> None:
    if (mask.shape[1], mask.shape[0]) != img.size:
        raise VembedError(
            f"{rec.source or rec.mask}: mask {rec.mask} is {mask.shape[1]}x{mask.shape[0]} but image "
            f"{rec.image} is {img.size[0]}x{img.size[1]}; they must be the same size"
        )


class SegEvalTransform:
    """Image → ``size x size`` normalised tensor; mask → ``size x size`` (nearest)."""

    def __init__(self, size: int, mean, std, interpolation: str = "bicubic"):
        self.size = size
        self.normalize = Normalize(mean, std)
        self.resample = _RESAMPLE.get(interpolation, Image.Resampling.BICUBIC)

    def image(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(img.resize((self.size, self.size), self.resample))

    def __call__(self, img: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        small = Image.fromarray(mask).resize((self.size, self.size), Image.Resampling.NEAREST)
        return self.image(img), torch.from_numpy(np.asarray(small, dtype=np.int64).copy())


class SegTrainTransform:
    """Random scale (shorter side ``size x s``, ``s`` in ``scale``), random ``size x size`` crop, flip.

    A crop larger than the scaled image is padded: the image with its mean colour (0 after
    normalisation), the mask with 255 (ignored by the loss). ``generator`` (a ``random.Random``,
    seeded per image by training) draws the scale, crop and flip; default: a fresh one.
    """

    takes_generator = True

    def __init__(
        self,
        size: int,
        mean,
        std,
        interpolation: str = "bicubic",
        *,
        scale: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
    ):
        self.size = size
        self.scale = scale
        self.flip = flip
        self.normalize = Normalize(mean, std)
        self.resample = _RESAMPLE.get(interpolation, Image.Resampling.BICUBIC)

    def __call__(
        self, img: Image.Image, mask: np.ndarray, generator: random.Random | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rng = generator if generator is not None else random.Random()
        w, h = img.size
        s = rng.uniform(*self.scale) * self.size / min(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        img = img.resize((nw, nh), self.resample)
        lab = Image.fromarray(mask).resize((nw, nh), Image.Resampling.NEAREST)
        left = rng.randint(0, max(0, nw - self.size))
        top = rng.randint(0, max(0, nh - self.size))
        box = (left, top, left + self.size, top + self.size)
        pixels = self.normalize(img.crop(box))  # Pillow pads a crop beyond the image with 0 (black)
        target = torch.from_numpy(np.asarray(lab.crop(box), dtype=np.int64).copy())
        cw, ch = min(self.size, nw - left), min(self.size, nh - top)
        if cw < self.size or ch < self.size:
            pixels[:, ch:, :] = 0.0
            pixels[:, :, cw:] = 0.0
            target[ch:, :] = IGNORE_INDEX
            target[:, cw:] = IGNORE_INDEX
        if self.flip and rng.random() < 0.5:
            pixels, target = pixels.flip(-1), target.flip(-1)
        return pixels, target


class SegmentationImages(Dataset):
    """``(pixels [3, S, S], mask [S, S] int64)`` per record; a class index beyond ``num_classes``
    (other than 255) or a size mismatch is an error naming the mask file."""

    def __init__(self, records: Sequence[SegRecord], transform, *, num_classes: int | None = None):
        self.records = list(records)
        self.transform = transform
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        rec = self.records[index]
        img, mask = load_image(rec.image), load_mask(rec.mask)
        check_pair(img, mask, rec)
        if self.num_classes is not None:
            check_classes(mask, self.num_classes, rec)
        return img, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(*self.load(index))


def check_classes(mask: np.ndarray, num_classes: int, rec: SegRecord) -> None:
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise VembedError(
            f"{rec.source or rec.mask}: mask {rec.mask} holds class {int(bad[0])}, but there are "
            f"{num_classes} classes (0-{num_classes - 1}, 255 = ignore); is it a colour/palette mask, or "
            "does the class list differ between the run and the data?"
        )
