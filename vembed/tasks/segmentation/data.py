"""Segmentation data: image + mask transforms that keep them aligned, and the dataset of mask records.

Images are resized with the model's interpolation, masks with nearest neighbour only (a mask pixel
is always one of the classes or 255). The input size is any multiple of the patch size.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vembed.data.images import (
    IGNORE_INDEX,
    Normalize,
    jitter_colours,
    load_image,
    load_mask,
    random_crop_box,
)
from vembed.data.records import SegRecord
from vembed.errors import VembedError

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


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
    """Geometric augmentation applied to image and mask alike, colour to the image only.

    Geometry, one of two: by default (``crop_scale=None``) a random zoom (shorter side ``size x z``,
    ``z`` in ``zoom``) and a random ``size x size`` crop, a crop larger than the zoomed image padded:
    the image with its mean colour (0 after normalisation), the mask with 255 (ignored by the loss);
    with ``crop_scale`` a random resized crop as for retrieval (share of the area in ``crop_scale``,
    aspect ratio in ``crop_ratio``, always inside the image). Then flips (probabilities ``hflip``,
    ``vflip``); masks are only resized with nearest neighbour. Colour jitter and grey scale change the
    image only. ``generator`` (a ``random.Random``, seeded per image by training) draws every choice;
    default: a fresh one.
    """

    takes_generator = True

    def __init__(
        self,
        size: int,
        mean,
        std,
        interpolation: str = "bicubic",
        *,
        zoom: tuple[float, float] = (0.5, 2.0),
        crop_scale: tuple[float, float] | None = None,
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.0,
        color_jitter: float = 0.0,
        grayscale: float = 0.0,
    ):
        self.size, self.zoom, self.crop_scale = size, zoom, crop_scale
        self.log_ratio = (math.log(crop_ratio[0]), math.log(crop_ratio[1]))
        self.hflip, self.vflip = hflip, vflip
        self.color_jitter, self.grayscale = color_jitter, grayscale
        self.normalize = Normalize(mean, std)
        self.resample = _RESAMPLE.get(interpolation, Image.Resampling.BICUBIC)

    def __call__(
        self, img: Image.Image, mask: np.ndarray, generator: random.Random | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rng = generator if generator is not None else random.Random()
        if self.crop_scale is None:
            img, lab, valid = self._zoom_crop(img, Image.fromarray(mask), rng)
        else:
            box = random_crop_box(img.size, self.crop_scale, self.log_ratio, rng)
            size = (self.size, self.size)
            img = img.resize(size, self.resample, box=box)
            lab = Image.fromarray(mask).resize(size, Image.Resampling.NEAREST, box=box)
            valid = size
        flip_h = bool(self.hflip) and rng.random() < self.hflip
        flip_v = bool(self.vflip) and rng.random() < self.vflip
        if self.color_jitter:
            img = jitter_colours(img, self.color_jitter, rng)
        if self.grayscale and rng.random() < self.grayscale:
            img = img.convert("L").convert("RGB")
        pixels = self.normalize(img)
        target = torch.from_numpy(np.asarray(lab, dtype=np.int64).copy())
        cw, ch = valid
        if cw < self.size or ch < self.size:  # the padding beyond the zoomed image
            pixels[:, ch:, :] = 0.0
            pixels[:, :, cw:] = 0.0
            target[ch:, :] = IGNORE_INDEX
            target[:, cw:] = IGNORE_INDEX
        if flip_h:
            pixels, target = pixels.flip(-1), target.flip(-1)
        if flip_v:
            pixels, target = pixels.flip(-2), target.flip(-2)
        return pixels, target

    def _zoom_crop(self, img: Image.Image, lab: Image.Image, rng):
        """Zoomed image and mask cropped to ``size x size`` (Pillow pads beyond the image with 0),
        and the width/height of the crop that lies inside the zoomed image."""
        w, h = img.size
        s = rng.uniform(*self.zoom) * self.size / min(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        img = img.resize((nw, nh), self.resample)
        lab = lab.resize((nw, nh), Image.Resampling.NEAREST)
        left = rng.randint(0, max(0, nw - self.size))
        top = rng.randint(0, max(0, nh - self.size))
        box = (left, top, left + self.size, top + self.size)
        return img.crop(box), lab.crop(box), (min(self.size, nw - left), min(self.size, nh - top))


class SegmentationImages(Dataset):
    """``(pixels [3, S, S], mask [S, S] int64)`` per record; a class index beyond ``num_classes``
    (other than 255) or a size mismatch is an error naming the mask file."""

    def __init__(
        self,
        records: Sequence[SegRecord],
        transform,
        *,
        num_classes: int | None = None,
        max_pixels: int | None = None,
    ):
        self.records = list(records)
        self.max_pixels = max_pixels  # data.max_image_pixels (None: the default limit)
        self.transform = transform
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        rec = self.records[index]
        img = load_image(rec.image, max_pixels=self.max_pixels)
        mask = load_mask(rec.mask, max_pixels=self.max_pixels)
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
