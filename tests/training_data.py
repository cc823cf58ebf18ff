"""Helpers of the training tests (a module, not tests): data a tiny random backbone must learn from.

The images of ``make_nuisance_dataset`` carry their class in colour and stripes (as conftest's
``class_image``) plus a random brightness offset per image. A random backbone's features follow the
brightness as much as the class, so zero-shot Recall@1 starts low (~0.4 with 8 classes); training has to
learn to ignore the offset, which every method and loss can do in a few seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from vembed.settings import Settings, load_settings


def nuisance_image(
    label: int, index: int, *, size: int = 28, seed: int = 0, offset: float = 50.0
) -> Image.Image:
    rng = np.random.default_rng([seed, label, index])
    hue = np.array([(label * 67) % 256, (label * 131 + 80) % 256, (label * 29 + 160) % 256], dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin((xx if label % 2 else yy) * (0.4 + 0.15 * (label % 5)))[..., None]
    arr = 128 + 0.5 * (hue - 128) * (0.6 + 0.4 * stripes) + rng.uniform(-offset, offset)
    arr = arr + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_nuisance_dataset(
    root: Path, *, num_classes: int = 8, per_class: int = 8, seed: int = 0, categories: int | None = None
) -> Path:
    """``root/images/c{k}/{i}.png`` and ``root/records.jsonl``; with ``categories``, a category per class."""
    lines = []
    for label in range(num_classes):
        folder = root / "images" / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            nuisance_image(label, i, seed=seed).save(folder / f"{i}.png")
            row = {"image": f"images/c{label}/{i}.png", "label": label}
            if categories:
                row["category"] = f"cat{label % categories}"
            lines.append(json.dumps(row))
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    return root / "records.jsonl"


def make_pair_dataset(root: Path, *, num_pairs: int = 16, seed: int = 0) -> Path:
    """Pair records (query_image / positive): two images of one class, no label field."""
    lines = []
    folder = root / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num_pairs):
        for side in ("q", "p"):
            nuisance_image(i % 8, 100 * i + (side == "p"), seed=seed).save(folder / f"{i}{side}.png")
        lines.append(json.dumps({"query_image": f"pairs/{i}q.png", "positive": f"pairs/{i}p.png"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def tiny_settings(model: Path, train: Path, out: Path, *overrides: str, val: Path | None = None) -> Settings:
    """Settings for a fast CPU run on a tiny model (override anything with ``key=value``)."""
    base = [
        f"model.name={model}",
        f"data.train={train}",
        f"train.output_dir={out}",
        "train.batch_size=8",
        "train.epochs=1",
        "train.lr=1e-3",
        "data.num_workers=0",
        "eval.k=1,5",
        "eval.batch_size=32",
    ]
    if val is not None:
        base.append(f"data.val={val}")
    return load_settings(None, [*base, *overrides])


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: on 2 busy cores, 2 threads spin against each other (10x slower tiny steps)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
