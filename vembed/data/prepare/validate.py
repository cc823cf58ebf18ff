"""Checks every prepare runs on its records: duplicates, missing files, and (optionally) decoding."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vembed.console import progress
from vembed.data.prepare.problems import ProblemLog
from vembed.data.records import ImageRecord
from vembed.errors import VembedError


@dataclass(frozen=True)
class CheckOptions:
    """How hard to check images (``--check-images``, ``--workers``) and whether to skip bad ones."""

    check_images: bool = False
    workers: int | None = None
    skip_bad: bool = False

    def recorded(self) -> dict:
        """What ``summary.json`` records of them (under ``options``)."""
        return {"check_images": self.check_images, "skip_bad": self.skip_bad}


def image_key(rec: ImageRecord) -> str:
    """The normalised absolute path that identifies an image."""
    return os.path.normpath(os.path.abspath(rec.image))


def drop_duplicates(records: Sequence[ImageRecord], log: ProblemLog) -> list[ImageRecord]:
    """Keep the first record of each image; a repeat with another label is a conflict (all dropped)."""
    first: dict[str, ImageRecord] = {}
    conflicted: set[str] = set()
    for rec in records:
        key = image_key(rec)
        seen = first.get(key)
        if seen is None:
            first[key] = rec
        elif seen.label != rec.label:
            conflicted.add(key)
            log.add(
                "conflicting-duplicate",
                rec.source or key,
                f"{rec.image} is also listed at {seen.source} with label {seen.label!r}, here {rec.label!r}",
            )
        else:
            log.add("duplicate", rec.source or key, f"{rec.image} is listed again (first at {seen.source})")
    return [rec for key, rec in first.items() if key not in conflicted]


def drop_missing(records: Sequence[ImageRecord], log: ProblemLog) -> list[ImageRecord]:
    """Records whose image file exists; the others are logged as missing."""
    kept = []
    for rec in records:
        if os.path.isfile(rec.image):
            kept.append(rec)
        else:
            log.add("missing-image", _where(rec), f"image not found: {rec.image}")
    return kept


def drop_undecodable(
    records: Sequence[ImageRecord], log: ProblemLog, *, workers: int | None = None
) -> list[ImageRecord]:
    """Decode every image in parallel threads (Pillow releases the GIL); log and drop the bad ones."""
    from vembed.data.images import load_image  # imports torch: only when images are decoded

    def check(rec: ImageRecord) -> str | None:
        try:
            load_image(rec.image)
        except VembedError as exc:
            return str(exc)
        return None

    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    errors: list[str | None] = []
    with progress() as bar, ThreadPoolExecutor(max_workers=workers) as pool:
        task = bar.add_task("decoding images", total=len(records))
        for error in pool.map(check, records):
            errors.append(error)
            bar.advance(task)
    kept = []
    for rec, error in zip(records, errors, strict=True):
        if error is None:
            kept.append(rec)
        else:
            log.add("bad-image", _where(rec), error)
    return kept


def validate_records(
    records: Sequence[ImageRecord], log: ProblemLog, *, check_images: bool = False, workers: int | None = None
) -> list[ImageRecord]:
    """Drop duplicates, then missing images, then (with ``check_images``) undecodable ones."""
    kept = drop_duplicates(records, log)
    kept = drop_missing(kept, log)
    if check_images and kept:
        kept = drop_undecodable(kept, log, workers=workers)
    return kept


def single_image_classes(records: Sequence[ImageRecord]) -> list:
    """Labels that occur exactly once (sorted by first appearance)."""
    counts: dict = defaultdict(int)
    for rec in records:
        counts[rec.label] += 1
    return [label for label, n in counts.items() if n == 1]


def _where(rec: ImageRecord) -> str:
    """The record's origin (``file:line``) when it says more than the image path the message names."""
    return rec.source if rec.source and rec.source != str(rec.image) else ""
