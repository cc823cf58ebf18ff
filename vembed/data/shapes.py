"""A synthetic segmentation set: squares and discs on a noisy background (tests, demos, benchmarks).

Written in the ``segfolder`` layout (``images/``, ``masks/``, ``classes.txt``), with a one-pixel
255 (ignore) outline around every shape as Pascal VOC has. Seeded: the same seed gives the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vembed.io import write_image, write_text

CLASS_NAMES = ("background", "square", "disc")


def shapes_sample(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One ``uint8 [size, size, 3]`` image and its ``uint8 [size, size]`` mask."""
    image = rng.normal(110, 25, (size, size, 3))
    mask = np.zeros((size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, 3))
        r = rng.uniform(0.12, 0.25) * size
        cy, cx = rng.uniform(r, size - r, 2)
        if cls == 1:
            inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
            colour = (200, 60, 50)
        else:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            colour = (50, 90, 210)
        image[inside] = np.asarray(colour) + rng.normal(0, 20, (int(inside.sum()), 3))
        ring = _outline(inside)
        mask[inside] = cls
        mask[ring] = 255
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _outline(inside: np.ndarray) -> np.ndarray:
    grown = inside.copy()
    grown[1:] |= inside[:-1]
    grown[:-1] |= inside[1:]
    grown[:, 1:] |= inside[:, :-1]
    grown[:, :-1] |= inside[:, 1:]
    return grown & ~inside


def write_shapes(root: str | Path, *, count: int = 24, size: int = 56, seed: int = 0) -> Path:
    """Write ``count`` samples as ``root/images/NNNN.png`` + ``root/masks/NNNN.png`` + classes.txt."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image, mask = shapes_sample(size, rng)
        write_image(root / "images" / f"{i:04d}.png", Image.fromarray(image, "RGB"))
        write_image(root / "masks" / f"{i:04d}.png", Image.fromarray(mask, "L"))
    write_text(root / "classes.txt", "".join(f"{name}\n" for name in CLASS_NAMES))
    return root
