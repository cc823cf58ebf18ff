"""A source cut into blocks of consecutive records, read as a stream (``vembed embed`` into shards).

A JSONL records file is read line by line: only the blocks a process owns are parsed, and only one
block's records are in memory at a time, so a 10⁷-line file embeds in bounded RAM. Other sources
(a folder, one image, paths on stdin) are listed first, then cut the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from vembed.data.records import ImageRecord, RecordSet, _paths, parse_record
from vembed.errors import VembedError
from vembed.index.sources import RECORD_SUFFIXES, STDIN, records_from_source


@dataclass
class Block:
    """Records ``[number·size, number·size + size)`` of the source; ``records`` is None when not owned."""

    number: int
    records: list[ImageRecord] | None
    problems: list[str] = field(default_factory=list)


def iter_blocks(
    source: str | Path,
    block_size: int,
    *,
    owned: Callable[[int], bool] = lambda number: True,
    image_root: str | Path | None = None,
    skip_bad: bool = False,
    exclude: set[str] | None = None,
) -> Iterator[Block]:
    """Every block of ``source`` in order; owned blocks are parsed and checked (images exist).

    ``exclude`` holds resolved image paths to leave out (already in the store, for ``--append``).
    """
    if block_size < 1:
        raise VembedError(f"shard size must be at least 1, got {block_size}")
    path = Path(str(source)).expanduser()
    if str(source) != STDIN and path.is_file() and path.suffix.lower() in RECORD_SUFFIXES:
        yield from _jsonl_blocks(path, block_size, owned, image_root, skip_bad, exclude)
        return
    records, problems = records_from_source(source, image_root=image_root, skip_bad=skip_bad)
    for number, start in enumerate(range(0, len(records), block_size)):
        chunk = records[start : start + block_size] if owned(number) else None
        yield Block(number, _without(chunk, exclude), problems if number == 0 else [])


def _jsonl_blocks(path, block_size, owned, image_root, skip_bad, exclude) -> Iterator[Block]:
    root = Path(image_root) if image_root is not None else path.parent
    with open(path, encoding="utf-8-sig") as fh:  # a BOM (Excel, Notepad) is not part of line 1
        lines = ((lineno, line) for lineno, line in enumerate(fh, start=1) if line.strip())
        number = 0
        any_line = False
        while True:
            chunk = list(islice(lines, block_size)) if owned(number) else _count(lines, block_size)
            if not chunk:
                break
            any_line = True
            if isinstance(chunk, int):
                yield Block(number, None)
            else:
                records, problems = _parse(path, chunk, root, skip_bad)
                yield Block(number, _without(records, exclude), problems)
            number += 1
    if not any_line:
        raise VembedError(f"{path}: no records (the file is empty)")


def _count(lines: Iterator, n: int) -> int:
    """Skip up to ``n`` lines without parsing them; how many there were."""
    return sum(1 for _ in islice(lines, n))


def _parse(path: Path, chunk, root: Path, skip_bad: bool) -> tuple[list[ImageRecord], list[str]]:
    records: list = []
    problems: list[str] = []
    for lineno, line in chunk:
        where = f"{path}:{lineno}"
        try:
            rec = parse_record(line, root=root, where=where)
            for image in _paths(rec):
                if not image.is_file():
                    raise VembedError(f"{where}: image not found: {image}")
        except VembedError as exc:
            if not skip_bad:
                raise
            problems.append(str(exc))
            continue
        records.append(rec)
    return RecordSet(path, records).images(), problems


def _without(records: list[ImageRecord] | None, exclude: set[str] | None) -> list[ImageRecord] | None:
    if records is None or not exclude:
        return records
    return [r for r in records if str(r.image.expanduser().resolve()) not in exclude]
