"""``vembed visualize pca``: a backbone's patch features seen as colour.

The patch tokens of every image (prefix tokens dropped) are pooled into one matrix per model, centred,
and projected on their first three principal components; each component, scaled to its 1st-99th
percentile over all the images, becomes one of red, green and blue. Patches of the same part of an
object get the same colour in every image: a coarse segmentation for free, and the quickest way to see
what a fine-tune changed. The picture has one row per image: the image as the model sees it (resized and
cropped), then one PCA map per model, the maps upsampled to the image's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vembed.console import progress
from vembed.data.images import EvalTransform, load_image
from vembed.errors import VembedError
from vembed.io import atomic_path
from vembed.models.embedder import Embedder

MAX_IMAGES = 16
_INTERPOLATE_KWARG = {
    "clip",
    "siglip",
    "vit",
}  # families that interpolate position embeddings only when asked


@dataclass
class PatchPCA:
    """One model's PCA of the patch features of a set of images."""

    model: str
    maps: list[np.ndarray]  # per image: float32 [h, w, 3] in [0, 1]
    explained: list[float]  # share of the patch features' variance per component (3 values)


def patch_tokens(embedder: Embedder, pixels: torch.Tensor) -> torch.Tensor:
    """Last-layer patch tokens ``[N, h, w, C]`` (float32, CPU) of preprocessed images ``[N, 3, S, S]``."""
    spec = embedder.spec
    h, w = pixels.shape[-2] // spec.patch_size, pixels.shape[-1] // spec.patch_size
    kwargs = {"interpolate_pos_encoding": True} if spec.family in _INTERPOLATE_KWARG else {}
    with torch.inference_mode():
        out = embedder.backbone(pixel_values=pixels.to(embedder.device, embedder.dtype), **kwargs)
    tokens = out.last_hidden_state[:, embedder.num_prefix_tokens :].float().cpu()
    if tokens.shape[1] != h * w:
        raise VembedError(
            f"{spec.name}: {tokens.shape[1]} patch tokens for a {h}x{w} grid; "
            f"is num_register_tokens ({spec.num_register_tokens}) right for this model?"
        )
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])


def fit_pca(features: Sequence[torch.Tensor], model: str = "") -> PatchPCA:
    """Three-component PCA fitted on the patches of all ``features`` (each ``[h, w, C]``) together."""
    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in features]).double()
    if flat.shape[0] < 3:
        raise VembedError(f"{model}: {flat.shape[0]} patch(es) in all; PCA needs at least 3")
    centred = flat - flat.mean(dim=0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:3]
    if components.shape[0] < 3:  # fewer feature channels than 3: pad with zero components
        components = torch.cat([components, torch.zeros(3 - components.shape[0], components.shape[1])])
    # a component's sign is arbitrary: point it so its largest projections are positive (stable colours)
    projected = centred @ components.T
    signs = torch.where(projected.max(0).values.abs() >= projected.min(0).values.abs(), 1.0, -1.0)
    projected = projected * signs
    low = torch.quantile(projected, 0.01, dim=0)
    high = torch.quantile(projected, 0.99, dim=0)
    scaled = ((projected - low) / (high - low).clamp_min(1e-12)).clamp(0, 1).float().numpy()
    variance = singular.pow(2)
    explained = (variance[:3] / variance.sum().clamp_min(1e-12)).tolist()
    maps, start = [], 0
    for f in features:
        n = f.shape[0] * f.shape[1]
        maps.append(scaled[start : start + n].reshape(f.shape[0], f.shape[1], 3))
        start += n
    return PatchPCA(model, maps, [float(e) for e in explained] + [0.0] * (3 - len(explained)))


def model_pca(
    embedder: Embedder, images: Sequence[Image.Image], *, name: str = "", batch_size: int = 8
) -> tuple[PatchPCA, list[Image.Image]]:
    """The PCA maps of ``images`` under one model, and the images as that model sees them."""
    transform = EvalTransform(embedder.spec)
    features, seen = [], []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        pixels = torch.stack([transform(img) for img in chunk])
        features.extend(patch_tokens(embedder, pixels))
        seen.extend(_as_seen(img, transform) for img in chunk)
    return fit_pca(features, name), seen


def _as_seen(img: Image.Image, transform: EvalTransform) -> Image.Image:
    from vembed.data.images import center_crop, resize_shorter

    if transform.square:
        return img.resize((transform.size, transform.size), transform.resample)
    return center_crop(resize_shorter(img, transform.resize_size, transform.resample), transform.size)


def pca_figure(
    images: Sequence[Image.Image], results: Sequence[PatchPCA], *, labels: Sequence[str] | None = None
):
    """The matplotlib figure: a row per image, the image then one PCA map per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(images), 1 + len(results)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.6 * cols, 2.6 * rows + 0.4), squeeze=False, layout="constrained"
    )
    for r, image in enumerate(images):
        axes[r][0].imshow(image)
        if labels is not None:
            axes[r][0].set_ylabel(_short(labels[r], 24), fontsize="small")
        for c, result in enumerate(results, start=1):
            axes[r][c].imshow(
                result.maps[r], interpolation="nearest", extent=(0, image.width, image.height, 0)
            )
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("image", fontsize="medium")
    for c, result in enumerate(results, start=1):
        share = ", ".join(f"{100 * e:.0f}" for e in result.explained)
        axes[0][c].set_title(f"{_short(result.model, 30)}\nPC1-3 = RGB ({share} % var.)", fontsize="small")
    return fig


def _short(name: str, limit: int) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def plot_pca(
    models: Sequence[tuple[str, Embedder]],
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    max_images: int = MAX_IMAGES,
    show_progress: bool = True,
) -> tuple[Path, list[PatchPCA]]:
    """Write the PCA picture of ``paths`` (at most ``max_images``) under each ``(name, embedder)``."""
    if not paths:
        raise VembedError("no images to draw")
    paths = list(paths)[:max_images]
    images = [load_image(p) for p in paths]
    results, seen = [], None
    with progress(enabled=show_progress) as bar:
        task = bar.add_task("patch features", total=len(models))
        for name, embedder in models:
            result, as_seen = model_pca(embedder, images, name=name)
            results.append(result)
            seen = seen or as_seen
            bar.advance(task)
    fig = pca_figure(seen, results, labels=[Path(p).name for p in paths])
    import matplotlib.pyplot as plt

    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out, results
