"""What every segmentation prepare source shares: checking image/mask pairs and writing the output.

Checks (each problem names the file): an image without a mask, a mask that does not decode or is a
colour image, a mask whose size differs from its image, a class index beyond the class list. The
output folder gets ``<split>.jsonl`` (``{"image": ..., "mask": ...}``), ``classes.txt`` (one name a
line, the first line names class 0), ``summary.json`` and ``problems.txt``, each written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from vembed.console import log as console_log
from vembed.console import progress
from vembed.data.prepare.output import PROBLEMS, SUMMARY, PrepareResult, _previous_files, split_files
from vembed.data.prepare.problems import ProblemLog
from vembed.data.prepare.summary import SHOWN_PROBLEMS, Provenance
from vembed.data.prepare.validate import CheckOptions
from vembed.data.records import SegRecord
from vembed.errors import VembedError
from vembed.io import write_json, write_jsonl, write_text

CLASSES = "classes.txt"
IGNORE = 255


def read_class_names(path: Path) -> list[str]:
    """One class name a line, the first naming class 0; blank lines at the end are dropped."""
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    for lineno, name in enumerate(names, start=1):
        if not name:
            raise VembedError(f"{path}:{lineno}: empty class name (line k names class k-1)")
    if len(names) < 2:
        raise VembedError(f"{path}: needs at least two class names, found {len(names)}")
    if len(names) > IGNORE:
        raise VembedError(f"{path}: {len(names)} classes; masks hold at most 255 (0-254, 255 = ignore)")
    return names


def check_pairs(
    records: Sequence[SegRecord],
    log: ProblemLog,
    *,
    num_classes: int | None,
    check: CheckOptions = CheckOptions(),
) -> tuple[list[SegRecord], np.ndarray]:
    """Keep the good pairs; return them and the pixel count of every class value 0-255 over them.

    Stops (listing the problems) unless ``skip_bad``. ``num_classes`` None: any index 0-254 is valid.
    """
    from vembed.data.images import image_size, load_image, load_mask  # torch only when checking

    seen: set[str] = set()
    unique = []
    for rec in records:
        key = os.path.normpath(os.path.abspath(rec.image))
        if key in seen:
            log.add("duplicate", rec.source or key, f"{rec.image} is listed again")
            continue
        seen.add(key)
        unique.append(rec)

    def inspect_pair(rec: SegRecord) -> tuple[str, str] | np.ndarray:
        if not os.path.isfile(rec.image):
            return "missing-image", f"image not found: {rec.image}"
        if not os.path.isfile(rec.mask):
            return "missing-mask", f"no mask for {rec.image} (expected {rec.mask})"
        try:
            size = load_image(rec.image).size if check.check_images else image_size(rec.image)
        except VembedError as exc:
            return "bad-image", str(exc)
        try:
            mask = load_mask(rec.mask)
        except VembedError as exc:
            return "bad-mask", str(exc)
        if (mask.shape[1], mask.shape[0]) != size:
            return "bad-mask", (
                f"{rec.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {rec.image} is "
                f"{size[0]}x{size[1]}; a mask must have its image's size"
            )
        counts = np.bincount(mask.reshape(-1), minlength=256)
        if num_classes is not None:
            beyond = np.flatnonzero(counts[num_classes:IGNORE])
            if beyond.size:
                return "bad-mask", (
                    f"{rec.mask} holds class index {num_classes + int(beyond[0])} but there are "
                    f"{num_classes} classes (0-{num_classes - 1}, 255 = ignore); a colour/palette mask "
                    "must be converted to class indices first"
                )
        return counts

    workers = check.workers or min(16, (os.cpu_count() or 1) + 4)
    kept, total = [], np.zeros(256, dtype=np.int64)
    with progress() as bar, ThreadPoolExecutor(max_workers=workers) as pool:
        task = bar.add_task("checking images and masks", total=len(unique))
        for rec, result in zip(unique, pool.map(inspect_pair, unique), strict=True):
            bar.advance(task)
            if isinstance(result, tuple):
                log.add(result[0], rec.source if rec.source != str(rec.image) else "", result[1])
            else:
                kept.append(rec)
                total += result
    log.raise_if_fatal(skip_bad=check.skip_bad)
    if not kept:
        raise VembedError("no usable image/mask pairs left after validation")
    return kept, total


def infer_class_names(pixel_counts: np.ndarray) -> list[str]:
    """Without a class list: classes 0..max index seen, named by their index."""
    present = np.flatnonzero(pixel_counts[:IGNORE])
    top = int(present.max()) if present.size else 0
    return [str(i) for i in range(max(top + 1, 2))]


def write_seg_prepared(
    out: str | Path,
    made: Provenance,
    *,
    class_names: Sequence[str],
    splits: dict[str, Sequence[SegRecord]],
    pixel_counts: np.ndarray,
    log: ProblemLog,
) -> PrepareResult:
    """Write every non-empty split, ``classes.txt``, problems and the summary; return the result."""
    out = Path(out)
    files = split_files(made, splits, log)
    extra = [PROBLEMS] if len(log) else []
    summary = {
        **made.summary(task="segmentation"),
        "images": sum(len(recs) for recs in splits.values()),
        "classes": len(class_names),
        "class_names": list(class_names),
        "pixels_per_class": {name: int(pixel_counts[i]) for i, name in enumerate(class_names)},
        "ignored_pixels": int(pixel_counts[IGNORE]),
        "splits": {name: {"file": files.get(name), "images": len(recs)} for name, recs in splits.items()},
        "problems": {"counts": log.counts(), "first": [str(p) for p in log.items[:SHOWN_PROBLEMS]]},
        "files": sorted([*files.values(), CLASSES, *extra, SUMMARY]),
    }
    previous = _previous_files(out)
    out.mkdir(parents=True, exist_ok=True)
    out_abs = os.path.abspath(out)
    for name, file in files.items():
        write_jsonl(
            out / file,
            ({"image": _rel(r.image, out_abs), "mask": _rel(r.mask, out_abs)} for r in splits[name]),
        )
    write_text(out / CLASSES, "".join(f"{name}\n" for name in class_names))
    if extra:
        write_text(out / PROBLEMS, "".join(f"{p.kind}\t{p}\n" for p in log))
    write_json(out / SUMMARY, summary)
    for stale in sorted(previous - set(summary["files"])):
        (out / stale).unlink(missing_ok=True)
    console_log(f"{len(class_names)} classes, {summary['images']:,} image/mask pairs")
    files = {name: out / file for name, file in files.items()}
    return PrepareResult(out, files, summary, list(log), seg_summary_table)


def _rel(path: Path, out_abs: str) -> str:
    p = os.path.abspath(path)
    if p.startswith(out_abs.rstrip(os.sep) + os.sep):
        p = os.path.relpath(p, out_abs)
    return Path(p).as_posix()


def seg_summary_table(summary: dict[str, Any], out: str | None = None) -> Table:
    """A rich table: images per split, then the class list with its pixel shares."""
    table = Table(title=f"{summary['dataset']} → {out}" if out else summary["dataset"])
    table.add_column("split", no_wrap=True)
    table.add_column("images", justify="right")
    table.add_row("all", f"{summary['images']:,}", style="bold")
    for name, stats in summary["splits"].items():
        label = stats["file"] or f"[yellow]{name} (empty: not written)[/]"
        table.add_row(label, f"{stats['images']:,}")
    pixels = summary["pixels_per_class"]
    total = sum(pixels.values()) or 1
    shown = list(pixels.items())[:12]
    classes = ", ".join(f"{name} {count / total:.0%}" for name, count in shown)
    more = f", ... ({len(pixels) - len(shown)} more)" if len(pixels) > len(shown) else ""
    table.caption = f"{summary['classes']} classes (pixel share): {classes}{more}"
    return table
