"""Write prepared splits: JSONL files, ``problems.txt`` and ``summary.json``, each atomically.

Image paths are relative to the output folder when the images live under it (the folder can move),
absolute otherwise; either way ``read_records(out / "train.jsonl")`` finds them. Only ``--out`` is
written to; files a previous run wrote there and this one does not (say ``unseen.jsonl`` from an
earlier ``--holdout-classes``) are removed, so the folder always describes the latest run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vembed.console import log as console_log
from vembed.data.prepare.problems import Problem, ProblemLog
from vembed.data.prepare.summary import Provenance, build_summary
from vembed.data.prepare.validate import CheckOptions, single_image_classes, validate_records
from vembed.data.records import ImageRecord
from vembed.errors import VembedError
from vembed.io import write_json, write_jsonl, write_text

SUMMARY = "summary.json"
PROBLEMS = "problems.txt"


@dataclass
class PrepareResult:
    """What a prepare run wrote: split name → JSONL path, the summary, and the problems found."""

    out: Path
    files: dict[str, Path]
    summary: dict[str, Any]
    problems: list[Problem]
    # the rich table of the summary (segmentation data sets show classes and pixels)
    table: Callable[..., Any] | None = None

    @property
    def summary_path(self) -> Path:
        return self.out / SUMMARY

    def summary_table(self):
        from vembed.data.prepare.summary import summary_table

        return (self.table or summary_table)(self.summary, out=str(self.out))


def clean_records(records: Sequence[ImageRecord], log: ProblemLog, checks: CheckOptions) -> list[ImageRecord]:
    """Validate the records (see :func:`validate_records`), stop on fatal problems unless ``skip_bad``,
    and log the classes with a single image."""
    console_log(f"checking {len(records):,} images" + (" (decoding each)" if checks.check_images else ""))
    kept = validate_records(records, log, check_images=checks.check_images, workers=checks.workers)
    log.raise_if_fatal(skip_bad=checks.skip_bad)
    if not kept:
        raise VembedError("no usable images left after validation")
    for label in single_image_classes(kept):
        log.add("single-image-class", f"class {label}", "only one image: never a retrieval query")
    return kept


def write_prepared(
    out: str | Path,
    made: Provenance,
    *,
    records: Sequence[ImageRecord],
    splits: dict[str, Sequence[ImageRecord]],
    log: ProblemLog,
) -> PrepareResult:
    """Write every non-empty split as ``<name>.jsonl``, then problems and summary; return the result.

    A split that came out empty is logged as a problem and not written; if all are empty nothing is.
    """
    out = Path(out)
    files = split_files(made, splits, log, check=lambda name, recs: _single_image_classes_in(name, recs, log))
    written = {name: out / file for name, file in files.items()}
    extra = [PROBLEMS] if len(log) else []
    summary = build_summary(made, records=records, splits=splits, files=files, log=log)
    summary["files"] = sorted([*files.values(), *extra, SUMMARY])
    previous = _previous_files(out)
    out.mkdir(parents=True, exist_ok=True)
    out_abs = os.path.abspath(out)
    for name, path in written.items():
        write_jsonl(path, (record_row(rec, out_abs) for rec in splits[name]))
    if extra:
        write_text(out / PROBLEMS, "".join(f"{p.kind}\t{p}\n" for p in log))
    write_json(out / SUMMARY, summary)
    for stale in sorted(previous - set(summary["files"])):
        (out / stale).unlink(missing_ok=True)
    return PrepareResult(out, written, summary, list(log))


def split_files(
    made: Provenance, splits: dict[str, Sequence], log: ProblemLog, *, check: Callable | None = None
) -> dict[str, str]:
    """``{split: "<split>.jsonl"}`` of the splits with records; an empty split is a problem (and not
    written), all empty an error. ``check(name, records)`` sees every non-empty split in turn."""
    if not any(splits.values()):
        raise VembedError(f"{made.dataset}: every split is empty; nothing to write")
    for name, recs in splits.items():
        if not recs:
            log.add("empty-split", name, "no images ended up in this split; it is not written")
        elif check is not None:
            check(name, recs)
    return {name: f"{name}.jsonl" for name, recs in splits.items() if recs}


EVAL_SPLITS = ("val", "test")  # evaluated all-vs-all: an image needs another of its class there


def _single_image_classes_in(name: str, records: Sequence[ImageRecord], log: ProblemLog) -> None:
    """One problem for the classes that have a single image in split ``name`` (val and test only)."""
    if name not in EVAL_SPLITS:
        return
    alone = single_image_classes([rec for rec in records if rec.label is not None])
    if not alone:
        return
    shown = ", ".join(map(str, alone[:5])) + (f" and {len(alone) - 5} more" if len(alone) > 5 else "")
    log.add(
        "single-image-in-split",
        name,
        f"{len(alone)} class(es) with only one image here ({shown}): never a retrieval query in this split "
        f"(nothing of its class to find); give those classes more images or raise --{name}-ratio",
    )


def record_row(rec: ImageRecord, out_abs: str) -> dict[str, Any]:
    """The JSONL object of a record: ``image`` relative to ``out_abs`` when under it, else absolute."""
    image = os.path.abspath(rec.image)
    if image.startswith(out_abs.rstrip(os.sep) + os.sep):
        image = os.path.relpath(image, out_abs)
    row: dict[str, Any] = {"image": Path(image).as_posix()}
    if rec.label is not None:
        row["label"] = rec.label
    if rec.category is not None:
        row["category"] = rec.category
    return row


def _previous_files(out: Path) -> set[str]:
    """Files listed by an earlier run's summary (plain names of ours only, never a path elsewhere)."""
    try:
        names = json.loads((out / SUMMARY).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {
        n
        for n in names
        if isinstance(n, str) and n == Path(n).name and n.endswith((".jsonl", ".txt", ".json"))
    }
