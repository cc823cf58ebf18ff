"""What every bench case shares: the profile (sizes), figures (ratios), the machine, timers, test data.

A case is a module ``bench/<name>.py`` with ``ORDER`` (an int: where it runs in ``python -m bench``;
modules without it, such as stand-alone scripts, are not cases),
a one-line docstring and ``run(profile: Profile) -> list[Figure]``. ``python -m bench`` finds the
modules itself, runs each in a fresh interpreter (own memory peak, own torch state), collects the
figures as JSON and appends a table to ``bench/RESULTS.md``.

Every :class:`Figure` compares vembed (``value``) with a baseline measured in the same run
(``baseline``), so the ratio means something on a loaded machine; ``higher_is_better`` says which
way the ratio reads (throughputs: ``value / baseline``; times: ``baseline / value``, so >1 is faster).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# DINOv2 shapes with random weights (saved like a hub checkpoint; nothing is downloaded).
SIZES = {  # name: (hidden, layers, heads, mlp, image size)
    "tiny": (32, 2, 2, 64, 28),
    "small": (384, 12, 6, 1536, 224),
    "base": (768, 12, 12, 3072, 224),
}


@dataclass(frozen=True)
class Profile:
    """Sizes for one machine class: ``cpu`` (minutes on 2 cores) or ``gpu`` (dinov2-base bf16 224 px)."""

    name: str
    device: str  # "cpu" or "cuda"
    model: str  # a SIZES key
    batch: int
    images: int  # images in generated data sets
    steps: int  # timed steps per training measurement
    warmup: int
    repeat: int  # best of N (other work on the machine adds noise)
    retrieval_n: int  # all-vs-all Recall@K size
    retrieval_dim: int
    photo_count: int  # SOP-like JPEGs for the input pipeline case
    threads: int = 0  # torch threads per case process (0: torch's default)
    workdir: Path = field(default=Path("/tmp"))

    @property
    def image_size(self) -> int:
        return SIZES[self.model][4]


PROFILES = {
    "cpu": Profile(
        name="cpu",
        device="cpu",
        model="tiny",
        batch=32,
        images=512,
        steps=20,
        warmup=4,
        repeat=2,
        retrieval_n=20_000,
        retrieval_dim=768,
        photo_count=96,
        # On a shared 2-core machine two OpenMP threads wait on each other whenever another process
        # holds a core (a tiny Linear then takes milliseconds): one thread gives stable ratios.
        threads=1,
    ),
    "smoke": Profile(  # minutes: checks that every case runs (python -m bench --profile smoke)
        name="smoke",
        device="cpu",
        model="tiny",
        batch=16,
        images=64,
        steps=3,
        warmup=1,
        repeat=1,
        retrieval_n=3000,
        retrieval_dim=64,
        photo_count=8,
        threads=1,
    ),
    "gpu": Profile(
        name="gpu",
        device="cuda",
        model="base",
        batch=128,
        images=2048,
        steps=20,
        warmup=5,
        repeat=1,
        retrieval_n=60_000,
        retrieval_dim=768,
        photo_count=512,
    ),
}


@dataclass
class Figure:
    """One measured comparison: vembed (or the option) against a baseline from the same run."""

    case: str
    what: str  # e.g. "embed img/s, tiny 28 px"
    value: float
    baseline: float
    baseline_name: str  # e.g. "naive loop"
    unit: str  # "img/s", "s", ...
    higher_is_better: bool = True
    target: float | None = None  # the ratio the issue asks for, if any
    note: str = ""
    detail: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if not self.value or not self.baseline or any(map(math.isnan, (self.value, self.baseline))):
            return float("nan")
        return self.value / self.baseline if self.higher_is_better else self.baseline / self.value

    @property
    def meets_target(self) -> bool | None:
        return None if self.target is None or math.isnan(self.ratio) else self.ratio >= self.target

    def to_json(self) -> dict:
        return {**asdict(self), "ratio": _round(self.ratio), "meets_target": self.meets_target}


def _round(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 3)


def machine() -> dict:
    """CPU model, cores, GPU name, torch version, load: the RESULTS.md header of a run."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from vembed.models.precision import cpu_has_native_bf16

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_bf16": cpu_has_native_bf16(),
        "gpu": gpu,
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def best_time(fn: Callable[[], object], repeat: int, *, sync: Callable[[], None] | None = None) -> float:
    """Fastest of ``repeat`` timed calls (after one untimed warm-up call), in seconds."""
    fn()
    best = float("inf")
    for _ in range(max(1, repeat)):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - start)
    return best


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def save_model(path: Path, size: str) -> Path:
    """A randomly initialised DINOv2 of ``size`` saved like a hub checkpoint (no download)."""
    import torch
    import transformers as tf

    hidden, layers, heads, mlp, image_size = SIZES[size]
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = tf.Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        image_size=image_size,
        patch_size=14,
    )
    tf.logging.set_verbosity_error()
    tf.Dinov2Model(config).save_pretrained(path)
    return path


def class_picture(label: int, index: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """An RGB picture whose colour and stripes depend on the class, with per-image noise."""
    rng = np.random.default_rng(seed * 100_003 + label * 1009 + index)
    w, h = size
    hue = np.array([(label * 67) % 256, (label * 131 + 80) % 256, (label * 29 + 160) % 256], float)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = np.sin((xx if label % 2 else yy) * (0.3 + 0.1 * (label % 5)))[..., None]
    arr = hue * (0.6 + 0.4 * stripes) + rng.normal(0, 20, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def make_records(
    root: Path, n: int, size: int | tuple[int, int], *, per_class: int = 8, fmt: str = "png"
) -> Path:
    """``n`` pictures (``per_class`` per class) under ``root/images`` and ``root/records.jsonl``.

    ``size`` is a side (square) or a ``(min, max)`` range of sides drawn per image (SOP-like photos);
    ``fmt`` is ``png`` or ``jpg`` (quality 90, as product photos are stored).
    """
    from PIL import Image

    records = root / "records.jsonl"
    if records.is_file():
        return records
    rng = np.random.default_rng(1)
    lines = []
    for i in range(n):
        label = i // per_class
        if isinstance(size, int):
            wh = (size, size)
        else:
            wh = (int(rng.integers(size[0], size[1] + 1)), int(rng.integers(size[0], size[1] + 1)))
        path = root / "images" / f"{i:06d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(class_picture(label, i, wh)).save(path, quality=90)
        lines.append(json.dumps({"image": f"images/{i:06d}.{fmt}", "label": label}))
    records.write_text("\n".join(lines) + "\n")
    return records


def log(message: str) -> None:
    """Progress on stderr (stdout of a case process carries its JSON)."""
    import sys

    print(message, file=sys.stderr, flush=True)
