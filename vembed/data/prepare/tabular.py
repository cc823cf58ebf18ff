"""The user's own records, as JSONL or CSV: validated line by line, normalised, then split.

Field names are mapped (``image_key="path"``, ``label_key="class"``, ...), relative image paths
resolve against ``image_root`` or the file's folder, and every problem names ``file:line``. A
``split`` column (``train``/``val``/``test``) is respected when present.
"""

from __future__ import annotations

import csv
import difflib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from vembed.console import log as console_log
from vembed.data.prepare.output import PrepareResult, clean_records, write_prepared
from vembed.data.prepare.problems import ProblemLog
from vembed.data.prepare.splits import SPLITS, SplitOptions, make_splits
from vembed.data.prepare.summary import Provenance
from vembed.data.prepare.validate import CheckOptions
from vembed.data.records import ImageRecord, json_object, resolve_path
from vembed.errors import VembedError
from vembed.io import read_text, text_lines

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"}
SPLIT_ALIASES |= {"test": "test", "testing": "test"}


def prepare_jsonl(file: str | Path, out: str | Path, **options: Any) -> PrepareResult:
    """Validate, normalise and split a JSONL file of labelled images; see :func:`prepare_table`."""
    return prepare_table(file, out, rows=_jsonl_rows, fmt="jsonl", **options)


def prepare_csv(
    file: str | Path, out: str | Path, *, delimiter: str | None = None, **options: Any
) -> PrepareResult:
    """Validate, normalise and split a CSV (or TSV) file with a header row; see :func:`prepare_table`."""
    required = {
        "--image-key": options.get("image_key", "image"),
        "--label-key": options.get("label_key", "label"),
    }
    return prepare_table(
        file, out, rows=lambda path: _csv_rows(path, delimiter, required), fmt="csv", **options
    )


def prepare_table(
    file: str | Path,
    out: str | Path,
    *,
    rows,
    fmt: str,
    image_key: str = "image",
    label_key: str = "label",
    category_key: str | None = "category",
    split_key: str | None = "split",
    image_root: str | Path | None = None,
    seed: int = 0,
    val_ratio: float = 0.1,
    test_ratio: float = 0.1,
    holdout_ratio: float = 0.0,
    shots: int = 0,
    check: CheckOptions = CheckOptions(),
) -> PrepareResult:
    """Read ``file`` with ``rows`` (yielding ``(line, dict | error)``), then validate, split and write."""
    file = Path(file)
    if not file.is_file():
        raise VembedError(f"records file not found: {file}")
    out = Path(out)
    root = Path(image_root) if image_root is not None else file.parent
    log = ProblemLog()
    keys = Keys(image_key, label_key, category_key, split_key)
    records, split_of = [], {}
    for lineno, row in rows(file):
        where = f"{file}:{lineno}"
        if isinstance(row, str):
            log.add("bad-record", where, row)
            continue
        parsed = parse_row(row, keys, root=root, where=where, log=log)
        if parsed is not None:
            rec, split = parsed
            records.append(rec)
            if split is not None:
                split_of[id(rec)] = split
    if not records and not len(log):
        raise VembedError(f"{file}: no records (the file is empty)")
    predefined_split = bool(split_of)
    if predefined_split:
        for rec in records:
            if id(rec) not in split_of:
                log.add("bad-record", rec.source, f"no '{split_key}' value, but other lines have one")
        records = [rec for rec in records if id(rec) in split_of]
    console_log(f"{len(records):,} records from {file}")
    kept = clean_records(records, log, check)
    predefined = None
    if predefined_split:
        predefined = {}
        for rec in kept:
            predefined.setdefault(split_of[id(rec)], []).append(rec)
        if "train" not in predefined:
            raise VembedError(f"{file}: the '{split_key}' column has no train rows")
        predefined = {name: predefined[name] for name in SPLITS if name in predefined}
    splitting = SplitOptions(seed, val_ratio, test_ratio, holdout_ratio, shots)
    splits = make_splits(kept, splitting, log=log, predefined=predefined)
    _refuse_overwriting(file, out, splits)
    options = {
        "format": fmt,
        "keys": {"image": image_key, "label": label_key, "category": category_key, "split": split_key},
        "image_root": str(root.absolute()),
        "split": "column" if predefined_split else {"val_ratio": val_ratio, "test_ratio": test_ratio},
        "holdout_ratio": holdout_ratio,
        "shots": shots,
        **check.recorded(),
    }
    return write_prepared(
        out,
        Provenance(f"{fmt}:{file.name}", str(file.absolute()), seed, options),
        records=kept,
        splits=splits,
        log=log,
    )


class Keys(NamedTuple):
    """Which field of a row holds the image path, label, category and split."""

    image: str
    label: str
    category: str | None
    split: str | None


def parse_row(
    row: dict[str, Any], keys: Keys, *, root: Path, where: str, log: ProblemLog
) -> tuple[ImageRecord, str | None] | None:
    """A row → ``(record, split or None)``; a bad row is logged and gives ``None``."""
    if "query_image" in row and keys.image not in row:
        log.add(
            "bad-record",
            where,
            "a pair record (query_image/positive): `vembed train` reads pairs as they are",
        )
        return None
    image = row.get(keys.image)
    if not isinstance(image, str) or not image.strip():
        log.add(
            "bad-record",
            where,
            f"missing field '{keys.image}' (the image path; fields here: {', '.join(map(str, row))}; "
            "map another with --image-key)",
        )
        return None
    label = row.get(keys.label)
    if isinstance(label, str):
        label = label.strip()
    if label is None or label == "":
        log.add(
            "bad-record",
            where,
            f"missing field '{keys.label}' (fields here: {', '.join(map(str, row))}; map another with --label-key)",
        )
        return None
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        log.add("bad-record", where, f"'{keys.label}' must be an integer or a string, got {label!r}")
        return None
    category = row.get(keys.category) if keys.category else None
    if category is not None and not isinstance(category, (str, int)):
        log.add("bad-record", where, f"'{keys.category}' must be a string, got {category!r}")
        return None
    category = (str(category).strip() or None) if category is not None else None
    split = None
    raw_split = row.get(keys.split) if keys.split else None
    if raw_split not in (None, ""):
        split = SPLIT_ALIASES.get(str(raw_split).strip().lower())
        if split is None:
            log.add("bad-record", where, f"'{keys.split}' must be train, val or test, got {raw_split!r}")
            return None
    path = resolve_path(image.strip(), root)
    return ImageRecord(path, label, category, where), split


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | str]]:
    for lineno, line in text_lines(path):
        if line.strip():
            yield lineno, json_object(line)


def _csv_rows(
    path: Path, delimiter: str | None, required: dict[str, str] | None = None
) -> Iterator[tuple[int, dict | str]]:
    """The rows of a CSV file; a column of ``required`` (option → column name) that the header lacks
    is one error for the file (every row would lack it)."""
    with io.StringIO(read_text(path), newline="") as fh:
        if delimiter is None:
            sample = fh.read(64 * 1024)
            fh.seek(0)
            try:
                delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
            except csv.Error:
                delimiter = ","
        reader = csv.DictReader(fh, delimiter=delimiter)
        if not reader.fieldnames:
            raise VembedError(f"{path}: no header row")
        for option, column in (required or {}).items():
            if column not in reader.fieldnames:
                close = difflib.get_close_matches(column, reader.fieldnames, n=1, cutoff=0.5)
                hint = (
                    f" (did you mean {option} {close[0]}?)" if close else f"; name the column with {option}"
                )
                raise VembedError(
                    f"{path}: no '{column}' column; the header has {', '.join(map(repr, reader.fieldnames))}{hint}"
                )
        for row in reader:
            if None in row:
                yield reader.line_num, f"{len(row[None])} more field(s) than the header has"
                continue
            if any(value is None for value in row.values()):
                yield reader.line_num, "fewer fields than the header has"
                continue
            yield reader.line_num, row


def _refuse_overwriting(file: Path, out: Path, splits: dict) -> None:
    """Never replace the input file with one of the outputs."""
    for name in splits:
        if (out / f"{name}.jsonl").resolve() == file.resolve():
            raise VembedError(f"{file} would be overwritten by the {name} split: choose another --out")
