"""ImageNet-C corruptions (Hendrycks & Dietterich 2019) at severities 1-5, seeded and deterministic.

Written with NumPy, SciPy and Pillow, with ImageNet-C's severity parameters. No maintained package
fits: ``imagecorruptions`` (the reference port, last released 2020) needs ``pkg_resources`` and fails
on NumPy 2 / current scikit-image for fog, and albumentations' transforms do not use ImageNet-C's
severity levels. Two departures, both documented in docs/segmentation.md: ``frost`` blends a
procedural ice texture (ImageNet-C blends six frost photographs it ships), and ``motion_blur`` /
``snow`` use a line kernel instead of ImageMagick's motion blur.

Every function takes and returns ``uint8 [H, W, 3]`` (shape and dtype kept) and draws its
randomness from ``numpy.random.default_rng(seed)`` only.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from vembed.errors import VembedError

SEVERITIES = (1, 2, 3, 4, 5)


def _unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --- noise ---------------------------------------------------------------------------------------


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sd = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    u = _unit(x)
    return _to_uint8(u + rng.normal(0.0, sd, u.shape))


def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    photons = (60, 25, 12, 5, 3)[severity - 1]
    return _to_uint8(rng.poisson(_unit(x) * photons) / photons)


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    u = _unit(x)
    hit = rng.random(u.shape) < amount
    salt = rng.random(u.shape) < 0.5
    u[hit & salt] = 1.0
    u[hit & ~salt] = 0.0
    return _to_uint8(u)


# --- blur ----------------------------------------------------------------------------------------


def _filter(u: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.convolve(u[..., c], kernel, mode="reflect") for c in range(u.shape[2])], -1)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    half = int(max(8, np.ceil(radius)))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    kernel = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    kernel /= kernel.sum()
    kernel = ndimage.gaussian_filter(kernel, alias_blur)
    return kernel / kernel.sum()


def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[severity - 1]
    return _to_uint8(_filter(_unit(x), _disk(radius, alias)))


def _line_kernel(radius: int, sigma: float, angle: float) -> np.ndarray:
    """A one-sided streak: weights exp(-d^2 / 2 sigma^2) along a line at ``angle`` degrees."""
    length = 2 * radius + 1
    weights = np.exp(-(np.arange(length) ** 2) / (2.0 * sigma**2))
    size = 2 * length + 1
    kernel = np.zeros((size, size))
    dy, dx = np.sin(np.deg2rad(angle)), np.cos(np.deg2rad(angle))
    for d, wgt in enumerate(weights):
        y, x = int(round(length + d * dy)), int(round(length + d * dx))
        kernel[y, x] += wgt
    return kernel / kernel.sum()


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[severity - 1]
    return _to_uint8(_filter(_unit(x), _line_kernel(radius, sigma, rng.uniform(-45, 45))))


def _clipped_zoom(u: np.ndarray, factor: float) -> np.ndarray:
    h, w = u.shape[:2]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = u[top : top + ch, left : left + cw]
    zoomed = ndimage.zoom(crop, (factor, factor, 1), order=1)
    zt, zl = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    out = zoomed[zt : zt + h, zl : zl + w]
    if out.shape[:2] != (h, w):  # rounding left it a pixel short: pad by edge
        out = np.pad(out, ((0, h - out.shape[0]), (0, w - out.shape[1]), (0, 0)), mode="edge")
    return out


def zoom_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    stop, step = ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03))[severity - 1]
    u = _unit(x)
    factors = np.arange(1.0, stop, step)
    out = u + sum(_clipped_zoom(u, f) for f in factors)
    return _to_uint8(out / (len(factors) + 1))


# --- weather -------------------------------------------------------------------------------------


def _plasma(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square fractal on a ``size x size`` grid (``size`` a power of two), scaled to [0, 1]."""
    grid = np.zeros((size, size))
    step = size
    scale = 100.0
    while step >= 2:
        half = step // 2
        # squares: centre of each step x step square = mean of its corners + noise
        corners = grid[0:size:step, 0:size:step]
        mean = (
            corners
            + np.roll(corners, -1, 0)
            + np.roll(corners, -1, 1)
            + np.roll(np.roll(corners, -1, 0), -1, 1)
        ) / 4
        grid[half:size:step, half:size:step] = mean + rng.uniform(-scale, scale, mean.shape)
        # diamonds: edge midpoints = mean of their four neighbours + noise
        centres = grid[half:size:step, half:size:step]
        tops = grid[0:size:step, 0:size:step]
        left_mid = (tops + np.roll(tops, -1, 0) + centres + np.roll(centres, 1, 1)) / 4
        grid[half:size:step, 0:size:step] = left_mid + rng.uniform(-scale, scale, left_mid.shape)
        top_mid = (tops + np.roll(tops, -1, 1) + centres + np.roll(centres, 1, 0)) / 4
        grid[0:size:step, half:size:step] = top_mid + rng.uniform(-scale, scale, top_mid.shape)
        step //= 2
        scale /= decay
    grid -= grid.min()
    return grid / max(grid.max(), 1e-12)


def _power_of_two(n: int) -> int:
    return 1 << max(1, int(np.ceil(np.log2(max(n, 2)))))


def fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[severity - 1]
    h, w = x.shape[:2]
    u = _unit(x)
    top = u.max()
    layer = _plasma(_power_of_two(max(h, w, 256)), decay, rng)[:h, :w, None]
    return _to_uint8((u + strength * layer) * top / (top + strength))


def _grey(u: np.ndarray) -> np.ndarray:
    return (u @ np.array([0.299, 0.587, 0.114]))[..., None]


def snow(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    loc, sd, zoom, threshold, radius, sigma, blend = (
        (0.1, 0.3, 3.0, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2.0, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4.0, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    )[severity - 1]
    h, w = x.shape[:2]
    u = _unit(x)
    flakes = rng.normal(loc, sd, (int(np.ceil(h / zoom)) + 1, int(np.ceil(w / zoom)) + 1))
    flakes = ndimage.zoom(flakes, zoom, order=1)[:h, :w]
    flakes = np.pad(flakes, ((0, h - flakes.shape[0]), (0, w - flakes.shape[1])), mode="edge")
    flakes[flakes < threshold] = 0.0
    kernel = _line_kernel(radius, sigma, rng.uniform(-135, -45))
    flakes = np.clip(ndimage.convolve(np.clip(flakes, 0, 1), kernel, mode="reflect"), 0, 1)[..., None]
    u = blend * u + (1 - blend) * np.maximum(u, _grey(u) * 1.5 + 0.5)
    return _to_uint8(u + flakes + np.rot90(flakes, 2))


def _frost_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural ice layer: thin bright crystal streaks over a faint fractal haze, in [0, 1]."""
    size = _power_of_two(max(h, w, 64))
    haze = _plasma(size, 1.6, rng)[:h, :w]
    streaks = np.zeros((h, w))
    for angle in rng.uniform(0, 180, 6):
        seeds = (rng.random((h, w)) > 0.985).astype(np.float64)
        streaks += ndimage.convolve(seeds, _line_kernel(6, 6.0, angle), mode="wrap")
    streaks = np.clip(streaks / max(streaks.max(), 1e-12) * 2.5, 0, 1)
    texture = np.clip(0.55 * haze + 0.75 * streaks, 0, 1)
    tint = np.array([0.85, 0.92, 1.0])  # frost is bluish white
    return texture[..., None] * tint


def frost(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    keep, amount = ((1.0, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[severity - 1]
    h, w = x.shape[:2]
    return _to_uint8(keep * _unit(x) + amount * _frost_texture(h, w, rng))


# --- digital -------------------------------------------------------------------------------------


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    shift = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    hsv = rgb_to_hsv(_unit(x))
    hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0, 1)
    return _to_uint8(hsv_to_rgb(hsv))


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    u = _unit(x)
    means = u.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((u - means) * factor + means)


def elastic_transform(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Random affine jitter, then a smooth random displacement field (ImageNet-C's 224-px parameters,
    scaled to the image's shorter side)."""
    alpha, sigma, jitter = (
        (2.0, 0.7, 0.1),
        (2.0, 0.08, 0.2),
        (0.05, 0.01, 0.02),
        (0.07, 0.01, 0.02),
        (0.12, 0.01, 0.02),
    )[severity - 1]
    h, w = x.shape[:2]
    unit = 244.0 * min(h, w) / 224.0  # ImageNet-C writes 244 x (fraction) for its 224 px images
    alpha, sigma, jitter = alpha * unit, sigma * unit, jitter * unit
    u = _unit(x)
    centre = np.array([h, w], dtype=np.float64) / 2
    side = min(h, w) // 3
    src = np.array([centre + side, [centre[0] + side, centre[1] - side], centre - side])
    dst = src + rng.uniform(-jitter, jitter, src.shape)
    # affine map from output coordinates back to input coordinates (dst -> src), solved exactly
    a = np.hstack([dst, np.ones((3, 1))])
    coeffs = np.linalg.solve(a, src)  # [3, 2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha
    ys, xs = yy + dy, xx + dx
    src_y = ys * coeffs[0, 0] + xs * coeffs[1, 0] + coeffs[2, 0]
    src_x = ys * coeffs[0, 1] + xs * coeffs[1, 1] + coeffs[2, 1]
    out = np.stack(
        [ndimage.map_coordinates(u[..., c], [src_y, src_x], order=1, mode="reflect") for c in range(3)], -1
    )
    return _to_uint8(out)


def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    h, w = x.shape[:2]
    small = Image.fromarray(x).resize(
        (max(1, int(w * factor)), max(1, int(h * factor))), Image.Resampling.BOX
    )
    return np.asarray(small.resize((w, h), Image.Resampling.BOX)).copy()


def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = (25, 18, 15, 10, 7)[severity - 1]
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.asarray(img.convert("RGB")).copy()


Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}


def corrupt(image: np.ndarray, name: str, severity: int, *, seed: int = 0) -> np.ndarray:
    """Apply one corruption to ``uint8 [H, W, 3]``; the same ``seed`` gives the same pixels."""
    if name not in CORRUPTIONS:
        raise VembedError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)} or 'all'")
    if severity not in SEVERITIES:
        raise VembedError(f"corruption severity must be 1-5, got {severity}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    out = CORRUPTIONS[name](image.copy(), severity, np.random.default_rng(seed))
    return np.ascontiguousarray(out, dtype=np.uint8)


def parse_corruptions(text: str | None) -> list[str]:
    """``"all"`` or ``"fog,snow"`` → names (validated); ``None`` → none."""
    if not text:
        return []
    if text.strip() == "all":
        return list(CORRUPTIONS)
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in CORRUPTIONS:
            import difflib

            close = difflib.get_close_matches(name, list(CORRUPTIONS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise VembedError(
                f"--corruptions: unknown corruption {name!r}{hint}; choose from all, {', '.join(CORRUPTIONS)}"
            )
    return names
