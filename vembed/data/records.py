"""The JSONL record format: labelled images, query/positive pairs and segmentation masks, validated
line by line.

Labelled image: ``{"image": "a/b.jpg", "label": 12, "category": "bicycle"}``
                (``vembed mine`` adds ``"negatives": ["c/d.jpg", ...]``: mined hard negatives, best first)
Pair:           ``{"query_image": "q.jpg", "positive": "p.jpg", "label": 12}``
Segmentation:   ``{"image": "images/a.jpg", "mask": "masks/a.png"}`` (one channel, class indices, 255 = ignore)
(the field names vembed-factory uses). Relative paths resolve against ``image_root`` or the JSONL
file's folder. Every problem names the file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vembed.errors import VembedError
from vembed.io import decode_line, raw_lines

T = TypeVar("T")
R = TypeVar("R")

Label = int | str


@dataclass(frozen=True)
class ImageRecord:
    """One image with an optional class label and super-category."""

    image: Path
    label: Label | None = None
    category: str | None = None
    source: str = ""  # "file.jsonl:12" — where the record came from, for error messages
    resized: Path | None = None  # a smaller copy to decode instead (``vembed prepare --resize-to``)
    negatives: tuple[Path, ...] | None = None  # mined hard negatives (``vembed mine``), best first

    @property
    def decode_path(self) -> Path:
        """The file to decode: the ``resized`` copy when it exists, else the original ``image``."""
        if self.resized is not None and self.resized.is_file():
            return self.resized
        return self.image


@dataclass(frozen=True)
class PairRecord:
    """A query image and a positive image of the same item."""

    query_image: Path
    positive: Path
    label: Label | None = None
    source: str = ""


@dataclass(frozen=True)
class SegRecord:
    """An image and its mask (one channel of class indices, 255 = ignore), same size."""

    image: Path
    mask: Path
    source: str = ""


Record = ImageRecord | PairRecord | SegRecord


@dataclass
class RecordSet:
    """Records read from one file, plus the problems skipped with ``skip_bad``."""

    path: Path | None
    records: list[Record]
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def is_pairs(self) -> bool:
        return bool(self.records) and isinstance(self.records[0], PairRecord)

    @property
    def is_segmentation(self) -> bool:
        return bool(self.records) and isinstance(self.records[0], SegRecord)

    def masks(self) -> list[SegRecord]:
        """The image/mask records; any other kind is an error naming the file."""
        if not self.is_segmentation:
            raise VembedError(
                f"{self.path or 'records'}: expected segmentation records "
                '{"image": ..., "mask": ...} (`vembed prepare segfolder` writes them)'
            )
        return list(self.records)  # type: ignore[arg-type]

    def images(self) -> list[ImageRecord]:
        """Labelled image records; pairs are split into two images sharing the pair's label."""
        out: list[ImageRecord] = []
        for i, rec in enumerate(self.records):
            if isinstance(rec, ImageRecord):
                out.append(rec)
            elif isinstance(rec, SegRecord):
                out.append(ImageRecord(rec.image, None, None, rec.source))
            else:
                label = rec.label if rec.label is not None else f"pair-{i}"
                out.append(ImageRecord(rec.query_image, label, None, rec.source))
                out.append(ImageRecord(rec.positive, label, None, rec.source))
        return out


def parse_each(rows: Iterable[T], parse: Callable[[T], R], *, skip_bad: bool) -> tuple[list[R], list[str]]:
    """``parse(row)`` of every row: a :class:`VembedError` it raises stops everything, or with
    ``skip_bad`` leaves that row out and its message in the problems returned with the rest."""
    parsed: list[R] = []
    problems: list[str] = []
    for row in rows:
        try:
            parsed.append(parse(row))
        except VembedError as exc:
            if not skip_bad:
                raise
            problems.append(str(exc))
    return parsed, problems


def read_records(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    check_exists: bool = True,
    skip_bad: bool = False,
    require_label: bool = False,
) -> RecordSet:
    """Read and validate a JSONL file of image or pair records.

    Raises :class:`VembedError` naming ``file:line`` for the first malformed line, missing field or
    missing image; with ``skip_bad`` such lines are skipped and listed in ``RecordSet.problems``.
    """
    path = Path(path)
    if path.is_dir():
        raise VembedError(folder_given_message(path))
    if not path.is_file():
        raise VembedError(f"records file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    kind: str | None = None

    def parse(line: tuple[int, bytes]) -> Record:
        nonlocal kind
        where = f"{path}:{line[0]}"
        rec = parse_record(decode_line(line[1], where), root=root, where=where, require_label=require_label)
        this_kind = type(rec).__name__
        if kind is None:
            kind = this_kind
        elif kind != this_kind:
            kinds = " and ".join(sorted((_KINDS[kind], _KINDS[this_kind]), reverse=True))
            raise VembedError(f"{where}: mixes {kinds} records in one file")
        if check_exists:
            for p in _paths(rec):
                if not p.is_file():
                    what = "mask" if isinstance(rec, SegRecord) and p == rec.mask else "image"
                    raise VembedError(f"{where}: {what} not found: {p}")
        return rec

    lines = (line for line in raw_lines(path) if line[1].strip())
    records, problems = parse_each(lines, parse, skip_bad=skip_bad)
    if not records and not problems:
        raise VembedError(f"{path}: no records (the file is empty)")
    return RecordSet(path, records, problems)


def folder_given_message(folder: Path) -> str:
    """What to give instead of ``folder`` where a records file (JSONL) was expected."""
    found = sorted(p.name for p in folder.glob("*.jsonl") if p.is_file())
    if found:
        first = next((name for name in ("train.jsonl", "val.jsonl", "test.jsonl") if name in found), found[0])
        return (
            f"{folder}: is a folder; give one of its records files ({', '.join(found[:6])}), "
            f"e.g. {folder / first}"
        )
    if next(walk_images(folder), None) is not None:
        return (
            f"{folder}: is a folder of images, not a records file; make records from it with "
            f"`vembed prepare imagefolder {folder} --out data/NAME` (one sub-folder per class)"
        )
    return f"{folder}: is a folder, not a records file (a JSONL file of images and labels)"


def json_object(line: str) -> dict[str, Any] | str:
    """One JSONL line → its object, or the problem with it as text (the caller adds file:line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"malformed JSON ({exc.msg}, column {exc.colno})"
    except RecursionError:
        return "malformed JSON (nested too deeply)"
    return obj if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"


_KINDS = {"ImageRecord": "image", "PairRecord": "pair", "SegRecord": "segmentation (image + mask)"}


def parse_record(line: str, *, root: Path, where: str, require_label: bool = False) -> Record:
    """Parse one JSONL line into a record; errors name ``where``."""
    obj = json_object(line)
    if isinstance(obj, str):
        raise VembedError(f"{where}: {obj}")
    label = _label(obj.get("label"), where)
    if require_label and label is None:
        raise VembedError(f"{where}: missing field 'label'")
    if "query_image" in obj or "positive" in obj:
        for key in ("query_image", "positive"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise VembedError(
                    f"{where}: {_bad_field(obj, key)} (a pair record needs query_image and positive)"
                )
        return PairRecord(
            resolve_path(obj["query_image"], root), resolve_path(obj["positive"], root), label, where
        )
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise VembedError(
            f"{where}: {_bad_field(obj, 'image')} (or 'query_image'/'positive' for a pair record)"
        )
    if "mask" in obj:
        mask = obj["mask"]
        if not isinstance(mask, str) or not mask:
            raise VembedError(f"{where}: 'mask' must be a path (a one-channel PNG of class indices)")
        return SegRecord(resolve_path(image, root), resolve_path(mask, root), where)
    category = obj.get("category")
    resized = obj.get("resized")
    if resized is not None and (not isinstance(resized, str) or not resized):
        raise VembedError(f"{where}: 'resized' must be a path (a string), got {resized!r}")
    negatives = obj.get("negatives")
    return ImageRecord(
        resolve_path(image, root),
        label,
        None if category is None else str(category),
        where,
        None if resized is None else resolve_path(resized, root),
        None if negatives is None else parse_negatives(negatives, root=root, where=where),
    )


def parse_negatives(value: Any, *, root: Path, where: str) -> tuple[Path, ...]:
    """A record's ``negatives``: a JSON list of image paths (``vembed mine`` writes the negatives'
    ``image`` strings, resolved like ``image``); anything else is an error naming ``where``."""
    if not isinstance(value, list):
        raise VembedError(
            f"{where}: 'negatives' must be a list of image paths (as `vembed mine` writes it), "
            f"got {type(value).__name__} {json.dumps(value)[:60]}"
        )
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise VembedError(
                f"{where}: negatives[{i}] must be an image path (a non-empty JSON string), "
                f"got {json.dumps(item)[:60]}"
            )
    return tuple(resolve_path(item, root) for item in value)


def _bad_field(obj: dict[str, Any], key: str) -> str:
    """Why ``obj[key]`` is not a usable path: missing, or of the wrong type (the value shown)."""
    if obj.get(key) in (None, ""):
        return f"missing field '{key}'"
    return f"field '{key}' must be a path (a JSON string), got {type(obj[key]).__name__} {json.dumps(obj[key])[:60]}"


def records_from_paths(paths: Iterable[str | Path], *, check_exists: bool = True) -> RecordSet:
    """Unlabelled image records for plain paths (arguments, stdin)."""
    records = []
    for p in paths:
        p = Path(p)
        if check_exists and not p.is_file():
            raise VembedError(f"image not found: {p}")
        records.append(ImageRecord(p, None, None, str(p)))
    if not records:
        raise VembedError("no images given")
    return RecordSet(None, records)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def records_from_folder(folder: str | Path, *, labels_from_dirs: bool = True) -> RecordSet:
    """Every image below ``folder`` (recursive, sorted); the parent folder name is the label."""
    folder = Path(folder)
    records = [folder_record(folder, parent, name, labels_from_dirs) for parent, name in walk_images(folder)]
    if not records:
        raise VembedError(no_images_message(folder))
    return RecordSet(None, records)


def walk_images(folder: Path) -> Iterator[tuple[Path, str]]:
    """``(directory, file name)`` of every image below ``folder``, lazily, sorted as full paths.

    One directory is listed (and sorted) at a time, depth first: visiting each directory's entries in
    name order gives the order of ``sorted(folder.rglob("*"))``, which compares paths part by part.
    Like ``rglob``, symlinked directories are not entered and unreadable ones are passed over.
    """
    names, dirs = [], set()
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if _is_real_dir(entry):
                    dirs.add(entry.name)
                    names.append(entry.name)
                elif _suffix(entry.name) in IMAGE_EXTENSIONS and entry.is_file():
                    names.append(entry.name)
    except (PermissionError, FileNotFoundError, NotADirectoryError):
        return
    names.sort()
    for name in names:
        if name in dirs:
            yield from walk_images(folder / name)
        else:
            yield folder, name


def folder_record(folder: Path, parent: Path, name: str, labels_from_dirs: bool = True) -> ImageRecord:
    """The record of image ``parent/name`` found below ``folder``: the sub-folder's name is its label."""
    path = parent / name
    return ImageRecord(path, parent.name if labels_from_dirs and parent != folder else None, None, str(path))


def no_images_message(folder: Path) -> str:
    return f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})"


def _suffix(name: str) -> str:
    """``PurePath(name).suffix.lower()``, without building a path."""
    i = name.rfind(".")
    return name[i:].lower() if 0 < i < len(name) - 1 else ""


def _is_real_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir() and not entry.is_symlink()
    except OSError:
        return False


def label_codes(labels: Sequence[Label | None]) -> tuple[list[int], list[Label]]:
    """Map labels to dense integer codes (in order of first appearance); ``None`` is an error."""
    index: dict[Label, int] = {}
    codes = []
    for lab in labels:
        if lab is None:
            raise VembedError("a record has no label, but this step needs labels")
        codes.append(index.setdefault(lab, len(index)))
    return codes, list(index)


def record_to_json(rec: Record, *, relative_to: Path | None = None) -> dict[str, Any]:
    """The JSONL form of a record (paths relative to ``relative_to`` when possible)."""

    def rel(p: Path) -> str:
        if relative_to is not None:
            try:
                return p.resolve().relative_to(relative_to.resolve()).as_posix()
            except ValueError:
                return str(p.resolve())  # a relative path would resolve against the wrong folder
        return str(p)

    if isinstance(rec, PairRecord):
        out: dict[str, Any] = {"query_image": rel(rec.query_image), "positive": rel(rec.positive)}
    elif isinstance(rec, SegRecord):
        return {"image": rel(rec.image), "mask": rel(rec.mask)}
    else:
        out = {"image": rel(rec.image)}
    if rec.label is not None:
        out["label"] = rec.label
    if isinstance(rec, ImageRecord) and rec.category is not None:
        out["category"] = rec.category
    if isinstance(rec, ImageRecord) and rec.resized is not None:
        out["resized"] = rel(rec.resized)
    if isinstance(rec, ImageRecord) and rec.negatives is not None:
        out["negatives"] = [rel(p) for p in rec.negatives]
    return out


def resolve_path(value: str, root: Path) -> Path:
    """``value`` (``~`` expanded) against ``root``; ``~name`` of no such user is a plain file name."""
    try:
        p = Path(value).expanduser()
    except RuntimeError:  # "~y.png": no user y
        return root.absolute() / value
    return p if p.is_absolute() else root / p


def _label(value: Any, where: str) -> Label | None:
    if value is None or (isinstance(value, (int, str)) and not isinstance(value, bool)):
        return value
    raise VembedError(f"{where}: 'label' must be an integer or a string, got {type(value).__name__}")


def _paths(rec: Record) -> tuple[Path, ...]:
    if isinstance(rec, SegRecord):
        return (rec.image, rec.mask)
    return (rec.query_image, rec.positive) if isinstance(rec, PairRecord) else (rec.image,)
