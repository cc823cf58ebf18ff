"""The only place vembed decodes images, and the transforms built from a model's spec.

Pillow + torch only (no torchvision): EXIF orientation, any mode → RGB, JPEG ``draft`` to decode
large photos at a reduced scale, then resize → centre crop → normalise.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from vembed.errors import VembedError
from vembed.models.registry import ModelSpec

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def load_image(
    path: str | Path, *, min_size: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decode an image file to an upright RGB ``PIL.Image``.

    ``min_size`` lets JPEGs decode at 1/2, 1/4 or 1/8 scale while keeping the shorter side at least
    that large (much faster for big photos). An image over ``max_pixels`` (default
    :data:`MAX_IMAGE_PIXELS`; the setting ``data.max_image_pixels``, passed down by every caller) is draft-decoded under the limit
    when it is a JPEG, and refused otherwise. Corrupt, truncated, empty or oversized files raise
    :class:`VembedError` naming the path.
    """
    path = Path(path)
    return _decode(path, path, min_size=min_size, max_pixels=max_pixels)


def decode_image_bytes(
    data: bytes, name: str = "image", *, min_size: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """:func:`load_image` for bytes received from elsewhere (an upload); errors name ``name``.

    An image over the pixel limit raises :class:`ImageTooLarge` (a :class:`VembedError`).
    """
    return _decode(io.BytesIO(data), name, min_size=min_size, max_pixels=max_pixels)


def _decode(source, name, *, min_size: int | None, max_pixels: int | None) -> Image.Image:
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(source) as img:
            w, h = img.size
            scale = min_size / min(w, h) if min_size else 1.0
            if limit and w * h > limit:  # draft picks a scale ≥ the one asked, so ask for half
                scale = min(scale, math.sqrt(limit / (w * h)) / 2)
            if scale < 1 and img.format == "JPEG":
                img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            check_pixels(name, img.size, limit, original=(w, h))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except FileNotFoundError:
        raise VembedError(f"image not found: {name}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError) and isinstance(source, io.BytesIO):
            raise VembedError(f"cannot decode image {name}: not an image format Pillow reads") from None
        raise VembedError(f"cannot decode image {name}: {exc}") from None


class ImageTooLarge(VembedError):
    """An image over the pixel limit (``data.max_image_pixels``): refused before its pixels are decoded."""


# vembed checks each image's size itself (above), so that a large JPEG can still be draft-decoded;
# Pillow's own check would refuse it (or print a raw warning) before the draft.
Image.MAX_IMAGE_PIXELS = None
MAX_IMAGE_PIXELS = 100_000_000  # data.max_image_pixels' default: ~300 MB once decoded as RGB


def check_pixels(path, size: tuple[int, int], limit: int, *, original: tuple[int, int] | None = None) -> None:
    """Refuse, naming the file, an image of ``size`` over ``limit`` pixels (0: no limit)."""
    if limit and size[0] * size[1] > limit:
        w, h = original or size
        raise ImageTooLarge(
            f"{path}: {w}×{h} pixels is over the limit of {limit:,} (data.max_image_pixels); "
            "too large to decode safely — shrink it, raise the limit, or skip it with --skip-bad"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB (16-bit scaled, alpha composited on white, CMYK converted)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class Normalize:
    """RGB image → float tensor ``[3, H, W]``, ``(x / 255 - mean) / std`` folded into one multiply-add."""

    def __init__(self, mean, std):
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
        return arr.mul(self.scale).sub_(self.shift)


def resize_shorter(img: Image.Image, size: int, resample) -> Image.Image:
    """Shorter side → ``size``; the longer side is truncated as transformers' image processors do."""
    w, h = img.size
    if min(w, h) == size:
        return img
    new = (size, max(1, int(size * h / w))) if w <= h else (max(1, int(size * w / h)), size)
    return img.resize(new, resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


class EvalTransform:
    """The model's evaluation preprocessing, as its own transformers image processor does it.

    ``spec.resize == "shorter"``: resize the shorter side to ``spec.resize_size``, centre-crop
    ``spec.image_size`` (DINOv2, CLIP); ``"square"``: resize to ``image_size`` x ``image_size`` without
    cropping (SigLIP, DINOv3). Then normalise.
    """

    def __init__(self, spec: ModelSpec):
        self.size = spec.image_size
        self.square = spec.resize == "square"
        self.resize_size = spec.image_size if self.square else spec.resize_size
        self.normalize = Normalize(spec.mean, spec.std)
        self.resample = _RESAMPLE.get(spec.interpolation, Image.Resampling.BICUBIC)

    @property
    def min_decode_size(self) -> int:
        return self.resize_size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.square:
            img = (
                img
                if img.size == (self.size, self.size)
                else img.resize((self.size, self.size), self.resample)
            )
        else:
            img = center_crop(resize_shorter(img, self.resize_size, self.resample), self.size)
        return self.normalize(img)


class TrainTransform:
    """Random resized crop, flips, colour jitter and grey scale (``train.augment``), then normalise.

    The crop is cut from the image decoded at a size that keeps even the smallest crop at or above
    the model's input resolution (:attr:`min_decode_size`), then resized to ``spec.image_size``.
    """

    takes_generator = True  # __call__(img, generator): training passes a seeded random.Random

    def __init__(
        self,
        spec: ModelSpec,
        *,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.0,
        vflip: float = 0.0,
        color_jitter: float = 0.0,
        grayscale: float = 0.0,
    ):
        self.size = spec.image_size
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.hflip, self.vflip = hflip, vflip
        self.color_jitter, self.grayscale = color_jitter, grayscale
        self.normalize = Normalize(spec.mean, spec.std)
        self.resample = _RESAMPLE.get(spec.interpolation, Image.Resampling.BICUBIC)
        # the shorter side of the smallest, most elongated crop of a square image is
        # side * sqrt(scale_min / max(ratio_max, 1 / ratio_min)): decode so that it is >= size
        stretch = max(ratio[1], 1 / ratio[0], 1.0)
        self._min_decode = math.ceil(self.size / math.sqrt(scale[0] / stretch) - 1e-9)

    @property
    def min_decode_size(self) -> int:
        return self._min_decode

    def __call__(self, img: Image.Image, generator: random.Random | None = None) -> torch.Tensor:
        """``generator`` draws every random choice (training seeds one per image); default: ``random``."""
        rng = generator if generator is not None else random
        img = self._crop(img, rng)
        if self.hflip and rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.vflip and rng.random() < self.vflip:
            img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        if self.color_jitter:
            img = self._jitter(img, rng)
        if self.grayscale and rng.random() < self.grayscale:
            img = img.convert("L").convert("RGB")
        return self.normalize(img)

    def _crop(self, img: Image.Image, rng) -> Image.Image:
        box = random_crop_box(img.size, self.scale, self.log_ratio, rng)
        return img.resize((self.size, self.size), self.resample, box=box)

    def _jitter(self, img: Image.Image, rng) -> Image.Image:
        return jitter_colours(img, self.color_jitter, rng)


def random_crop_box(
    size: tuple[int, int], scale: tuple[float, float], log_ratio: tuple[float, float], rng
) -> tuple[int, int, int, int]:
    """A random resized crop's box ``(left, top, right, bottom)`` in an image of ``size`` (w, h):
    ``scale`` of its area, aspect ratio ``exp(log_ratio)``; ten tries, then the centre square."""
    w, h = size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            break
    else:
        cw = ch = min(w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def jitter_colours(img: Image.Image, amount: float, rng) -> Image.Image:
    """Brightness, contrast and saturation, each by a factor in [1 - amount, 1 + amount], in random order."""
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(enhancers)
    for enhancer in enhancers:
        img = enhancer(img).enhance(rng.uniform(max(0.0, 1 - amount), 1 + amount))
    return img


IGNORE_INDEX = 255
MASK_HINT = (
    "save masks as one-channel PNGs whose pixel values are class indices (255 = ignore), e.g. "
    "Image.fromarray(indices.astype('uint8')).save('mask.png')"
)


def load_mask(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode a segmentation mask to ``uint8 [H, W]`` class indices (255 = ignore).

    One-channel PNGs (mode ``L``) are read as they are; palette PNGs (``P``, as Pascal VOC ships them)
    give their palette indices, which are the class indices. Colour masks (RGB) are refused with how
    to convert them.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            check_pixels(path, img.size, MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)
            img.load()
            mode = img.mode
            if mode in ("L", "P"):
                return np.asarray(img, dtype=np.uint8).copy()
            if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                arr = np.asarray(img)
                if arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise VembedError(
                        f"{path}: mask holds values up to {int(arr.max())}; class indices must be 0-254 "
                        "(255 = ignore)"
                    )
                return arr.astype(np.uint8)
    except FileNotFoundError:
        raise VembedError(f"mask not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise VembedError(f"cannot decode mask {path}: {exc}") from None
    raise VembedError(
        f"{path}: the mask is a {mode} image (colours, not class indices); {MASK_HINT}. "
        "Pascal VOC colour masks: use `vembed prepare voc`, which reads the palette PNGs directly"
    )


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the file header, without decoding the pixels (EXIF rotation applied)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise VembedError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise VembedError(f"cannot decode image {path}: {exc}") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
