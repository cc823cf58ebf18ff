"""``vembed prepare ... --resize-to N``: a cache of copies whose shorter side is N, beside the records.

Decoding a 1,000 px product photo costs several times decoding a 256 px one, every epoch. This step
runs after any prepare source has written its splits: each image whose shorter side is larger than N
gets an upright RGB JPEG copy (quality 95) in ``OUT/resized-N/``, and its record gains a ``resized``
field next to ``image``, which keeps the original's path (search results, stores and problems still
name the original). Loaders read ``resized`` when the file is there, else ``image``. Images already
small enough get no copy. Copies newer than their original are reused, so a rerun is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from vembed.console import log
from vembed.data.prepare.output import SUMMARY, PrepareResult
from vembed.errors import VembedError
from vembed.io import atomic_path, write_json, write_jsonl

QUALITY = 95


def resize_prepared(result: PrepareResult, size: int, *, workers: int | None = None) -> PrepareResult:
    """Write the shorter-side-``size`` copies of every image in ``result``'s splits, add ``resized``."""
    if size < 32:
        raise VembedError(
            f"--resize-to {size}: too small (at least 32; use the model's resize size, e.g. 256)"
        )
    folder = result.out / f"resized-{size}"
    rows_by_file = {name: _read_rows(path) for name, path in result.files.items()}
    originals = sorted({row["image"] for rows in rows_by_file.values() for row in rows if "image" in row})
    targets = {image: folder / _cache_name(image) for image in originals}
    log(f"resizing {len(originals):,} images to a shorter side of {size} px in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(workers or min(32, (os.cpu_count() or 1) + 4)) as pool:
        made = dict(
            zip(
                originals,
                pool.map(
                    lambda image: _resize(_absolute(image, result.out), targets[image], size), originals
                ),
                strict=True,
            )
        )
    for name, path in result.files.items():
        rows = rows_by_file[name]
        for row in rows:
            if made.get(row.get("image")):
                row["resized"] = os.path.relpath(targets[row["image"]], result.out)
        write_jsonl(path, rows)
    copies = sum(bool(v) for v in made.values())
    summary = {**result.summary, "resized": {"size": size, "folder": folder.name, "copies": copies}}
    write_json(result.out / SUMMARY, summary)
    log(f"{copies:,} copies in {folder.name}/ ({len(originals) - copies:,} images already small enough)")
    return PrepareResult(result.out, result.files, summary, result.problems, result.table)


def _resize(source: Path, target: Path, size: int) -> bool:
    """Write ``target`` (shorter side ``size``) unless the image is no larger; True when a copy exists."""
    from vembed.data.images import load_image, resize_shorter

    try:
        if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
            return True
        img = load_image(source, min_size=size)  # upright RGB; JPEGs decoded at a reduced scale
    except (OSError, VembedError):
        return False  # no copy: the loader reads (and reports) the original
    if min(img.size) <= size:
        target.unlink(missing_ok=True)
        return False
    small = resize_shorter(img, size, Image.Resampling.BICUBIC)
    with atomic_path(target) as tmp:
        small.save(tmp, format="JPEG", quality=QUALITY)
    return True


def _cache_name(image: str) -> str:
    """A stable, collision-free file name for an image path as written in the records."""
    digest = hashlib.sha1(image.encode("utf-8")).hexdigest()[:16]
    return f"{digest}-{Path(image).stem[:40]}.jpg"


def _absolute(image: str, out: Path) -> Path:
    path = Path(image)
    return path if path.is_absolute() else out / path


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
