"""What ``vembed embed`` and ``vembed search`` read: folders, JSONL records, image paths, stdin."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import torch

from vembed.data.records import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    json_object,
    read_records,
    records_from_folder,
    records_from_paths,
)
from vembed.errors import VembedError
from vembed.index.search import Query

STDIN = "-"
RECORD_SUFFIXES = (".jsonl", ".json", ".ndjson")
NO_STDIN_PATHS = "no image paths on stdin (one path per line)"


def records_from_source(
    source: str | Path,
    *,
    image_root: str | Path | None = None,
    skip_bad: bool = False,
    stdin: TextIO | None = None,
) -> tuple[list[ImageRecord], list[str]]:
    """Image records from a folder (recursive; sub-folder names are labels), a JSONL records file, one
    image, or ``-`` (paths on stdin, one per line). Returns ``(records, problems skipped)``.
    """
    text = str(source)
    if text == STDIN:
        return _records_from_lines(stdin or sys.stdin, skip_bad=skip_bad)
    path = Path(text).expanduser()
    if path.is_dir():
        return records_from_folder(path).images(), []
    if path.is_file() and path.suffix.lower() in RECORD_SUFFIXES:
        found = read_records(path, image_root=image_root, skip_bad=skip_bad)
        return found.images(), list(found.problems)
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        return records_from_paths([path]).images(), []
    check_source(source)
    raise VembedError(f"source not found: {path}")


def check_source(source: str | Path) -> None:
    """What is wrong with ``source`` that shows without reading it — a path that does not exist, a file
    that is neither records nor an image — raised before any model is loaded."""
    text = str(source)
    path = Path(text).expanduser()
    if text == STDIN or path.is_dir():
        return
    if path.is_file() and path.suffix.lower() in (*RECORD_SUFFIXES, *IMAGE_EXTENSIONS):
        return
    if path.is_file():
        raise VembedError(
            f"{path}: not a folder, a records file ({', '.join(RECORD_SUFFIXES)}) or an image "
            f"({', '.join(IMAGE_EXTENSIONS)}); pass '-' to read image paths from stdin"
        )
    raise VembedError(f"source not found: {path}")


def queries_from_args(
    items: Iterable[str],
    *,
    image_root: str | Path | None = None,
    skip_bad: bool = False,
    stdin: TextIO | None = None,
) -> tuple[list[Query], list[str]]:
    """Queries from command-line items: image paths, folders, JSONL records files, or ``-`` for stdin.

    On stdin each line is an image path, or a JSON object: ``{"path": ..., "embedding": [...]}`` (what
    ``vembed embed --jsonl`` prints) is searched as it is; ``{"image"|"path": ..., "label": ...}`` is
    an image with a known label (drawn with a green/red border in the grid).
    """
    queries: list[Query] = []
    problems: list[str] = []
    for item in items:
        if item == STDIN:
            found, bad = _queries_from_lines(stdin or sys.stdin, skip_bad=skip_bad)
            queries += found
            problems += bad
            continue
        path = Path(item).expanduser()
        if path.is_dir() or (path.is_file() and path.suffix.lower() in RECORD_SUFFIXES):
            records, bad = records_from_source(path, image_root=image_root, skip_bad=skip_bad)
            queries += [Query(str(r.image), r.image, r.label) for r in records]
            problems += bad
        elif path.is_file():
            queries.append(Query(item, path))
        elif skip_bad:
            problems.append(f"query image not found: {item}")
        else:
            raise VembedError(f"query image not found: {item}")
    if not queries:
        raise VembedError("no queries: pass image paths, a folder, a .jsonl file, or - to read stdin")
    return queries, problems


def nonblank_lines(stream: TextIO) -> Iterator[tuple[int, str]]:
    """``(line number, stripped line)`` of every non-blank line, read lazily."""
    for lineno, line in enumerate(stream, start=1):
        line = line.strip()
        if line:
            yield lineno, line


def path_records(lines: Iterable[tuple[int, str]], *, skip_bad: bool) -> tuple[list[ImageRecord], list[str]]:
    """Unlabelled records of image paths read from stdin as ``(line number, path)``, and the problems
    skipped with ``skip_bad`` (a path that is not a file)."""
    records, problems = [], []
    for lineno, line in lines:
        path = Path(line).expanduser()
        if path.is_file():
            records.append(ImageRecord(path, None, None, str(path)))
        elif skip_bad:
            problems.append(f"<stdin>:{lineno}: image not found: {line}")
        else:
            raise VembedError(f"<stdin>:{lineno}: image not found: {line}")
    return records, problems


def _records_from_lines(stream: TextIO, *, skip_bad: bool) -> tuple[list[ImageRecord], list[str]]:
    records, problems = path_records(nonblank_lines(stream), skip_bad=skip_bad)
    if not records:
        raise VembedError(NO_STDIN_PATHS)
    return records, problems


def _queries_from_lines(stream: TextIO, *, skip_bad: bool) -> tuple[list[Query], list[str]]:
    queries, problems = [], []
    for lineno, line in nonblank_lines(stream):
        where = f"<stdin>:{lineno}"
        try:
            queries.append(
                _query_from_json(line, where) if line.startswith("{") else _query_path(line, where)
            )
        except VembedError as exc:
            if not skip_bad:
                raise
            problems.append(str(exc))
    return queries, problems


def _query_path(text: str, where: str, label=None) -> Query:
    path = Path(text).expanduser()
    if not path.is_file():
        raise VembedError(f"{where}: image not found: {text}")
    return Query(text, path, label)


def _query_from_json(line: str, where: str) -> Query:
    obj = json_object(line)
    if isinstance(obj, str):
        raise VembedError(f"{where}: {obj}")
    name = obj.get("path", obj.get("image"))
    if name is not None and not isinstance(name, str):
        raise VembedError(f"{where}: 'path' must be a string")
    label = obj.get("label")
    if "embedding" in obj:
        vector = obj["embedding"]
        if (
            not isinstance(vector, list)
            or not vector
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vector)
        ):
            raise VembedError(f"{where}: 'embedding' must be a non-empty list of numbers")
        tensor = torch.tensor(vector, dtype=torch.float32)
        if not torch.isfinite(tensor).all():
            raise VembedError(f"{where}: 'embedding' holds NaN or infinite values")
        return Query(name or where, Path(name) if name else None, label, tensor)
    if name is None:
        raise VembedError(f"{where}: expected 'path' (an image) or 'embedding' (from `vembed embed --jsonl`)")
    return _query_path(name, where, label)
