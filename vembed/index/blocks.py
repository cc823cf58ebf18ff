"""A source cut into blocks of consecutive records, read as a stream (``vembed embed`` into shards).

Every source is read lazily, one block at a time: a JSONL records file line by line, a folder one
directory at a time (in the order and with the labels of :func:`vembed.data.records.records_from_folder`),
image paths on stdin line by line. Only the blocks a process owns are parsed and checked (images
exist); the others are only read and digested (a resumed job checks that a finished block's items
are still the same). So only one block's records are in memory at a time, and a
10⁷-line file or a folder of 10⁷ images embeds in bounded RAM (a folder's largest directory listing
aside: each directory is listed and sorted whole).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TextIO

from vembed.data.records import (
    ImageRecord,
    RecordSet,
    _paths,
    folder_record,
    no_images_message,
    parse_each,
    parse_record,
    walk_images,
)
from vembed.errors import VembedError
from vembed.index.sources import (
    NO_STDIN_PATHS,
    RECORD_SUFFIXES,
    STDIN,
    nonblank_lines,
    path_records,
    records_from_source,
)
from vembed.io import decode_line


@dataclass
class Block:
    """Records ``[number·size, number·size + size)`` of the source; ``records`` is None when not owned."""

    number: int
    records: list[ImageRecord] | None
    problems: list[str] = field(default_factory=list)
    digest: str = ""  # of the block's raw items (lines, paths), owned or not: a resumed job checks it


Parse = Callable[[list], tuple[list[ImageRecord], list[str]]]


def iter_blocks(
    source: str | Path,
    block_size: int,
    *,
    owned: Callable[[int], bool] = lambda number: True,
    image_root: str | Path | None = None,
    skip_bad: bool = False,
    exclude: set[str] | None = None,
    stdin: TextIO | None = None,
) -> Iterator[Block]:
    """Every block of ``source`` in order; owned blocks are parsed and checked (images exist).

    ``exclude`` holds resolved image paths to leave out (already in the store, for ``--append``).
    """
    if block_size < 1:
        raise VembedError(f"shard size must be at least 1, got {block_size}")
    text = str(source)
    path = Path(text).expanduser()
    if text == STDIN:
        lines = nonblank_lines(stdin or sys.stdin)
        blocks = _cut(lines, block_size, owned, partial(path_records, skip_bad=skip_bad))
        yield from _checked(blocks, exclude, empty=NO_STDIN_PATHS, need_records=True)
    elif path.is_dir():
        items = walk_images(path)
        blocks = _cut(items, block_size, owned, lambda chunk: ([folder_record(path, *i) for i in chunk], []))
        yield from _checked(blocks, exclude, empty=no_images_message(path))
    elif path.is_file() and path.suffix.lower() in RECORD_SUFFIXES:
        root = Path(image_root) if image_root is not None else path.parent
        # a BOM (Excel, Notepad) is not part of line 1; bytes that are not UTF-8 are kept for _parse to name
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as fh:
            lines = ((lineno, line) for lineno, line in enumerate(fh, start=1) if line.strip())
            blocks = _cut(lines, block_size, owned, lambda chunk: _parse(path, chunk, root, skip_bad))
            yield from _checked(blocks, exclude, empty=f"{path}: no records (the file is empty)")
    else:  # one image (or an error naming what the source is not)
        records, problems = records_from_source(source, image_root=image_root, skip_bad=skip_bad)
        for number, start in enumerate(range(0, len(records), block_size)):
            chunk = records[start : start + block_size]
            digest = _digest(str(r.image) for r in chunk)
            kept = _without(chunk, exclude) if owned(number) else None
            yield Block(number, kept, problems if number == 0 else [], digest)


def _cut(items: Iterator, block_size: int, owned: Callable[[int], bool], parse: Parse) -> Iterator[Block]:
    """``items`` in blocks of ``block_size``: owned ones parsed, the others only read and digested."""
    number = 0
    while True:
        chunk = list(islice(items, block_size))
        if not chunk:
            return
        digest = _digest(_item_text(item) for item in chunk)
        yield Block(number, *parse(chunk), digest) if owned(number) else Block(number, None, [], digest)
        number += 1


def _item_text(item: tuple) -> str:
    """A line's text (``(line number, line)``: not its number, so blank lines may come and go) or a
    folder image's path (``(directory, name)``)."""
    first, second = item
    return second if isinstance(first, int) else str(first / second)


def _digest(texts: Iterable[str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()


def _checked(
    blocks: Iterable[Block], exclude: set[str] | None, *, empty: str, need_records: bool = False
) -> Iterator[Block]:
    """``blocks`` without the ``exclude``d images; ``empty`` is the error when there was nothing in the
    source (with ``need_records``, also when every item of the owned blocks was bad)."""
    seen = False
    for block in blocks:
        seen = seen or not need_records or block.records is None or bool(block.records)
        block.records = _without(block.records, exclude)
        yield block
    if not seen:
        raise VembedError(empty)


def _parse(path: Path, chunk, root: Path, skip_bad: bool) -> tuple[list[ImageRecord], list[str]]:
    def parse(item: tuple[int, str]):
        where = f"{path}:{item[0]}"
        rec = parse_record(
            decode_line(item[1].encode("utf-8", "surrogateescape"), where), root=root, where=where
        )
        for image in _paths(rec):
            if not image.is_file():
                raise VembedError(f"{where}: image not found: {image}")
        return rec

    records, problems = parse_each(chunk, parse, skip_bad=skip_bad)
    return RecordSet(path, records).images(), problems


def _without(records: list[ImageRecord] | None, exclude: set[str] | None) -> list[ImageRecord] | None:
    if records is None or not exclude:
        return records
    return [r for r in records if str(r.image.expanduser().resolve()) not in exclude]
