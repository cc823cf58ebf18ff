"""Captioned images: JSONL rows ``{"image": ..., "text": "..."}`` or ``{"image": ..., "captions": [...]}``.

Several captions per image (Flickr30k and COCO have five) come as a ``captions`` list or as several rows
naming the same image: the rows of one image are merged, in file order. Relative paths resolve against
``image_root`` or the JSONL file's folder; an empty or non-string caption is an error naming file:line.
Other keys (``label``, ``category`` ...) are ignored. vembed-factory's t2i / i2t rows
``{"query": "a caption", "positive": "img.jpg"}`` (or the image as ``query``) are read as ``{"image", "text"}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vembed.data.records import IMAGE_EXTENSIONS, ImageRecord, _suffix, json_object, resolve_path
from vembed.errors import VembedError

__all__ = ["CaptionRecord", "CaptionSet", "parse_caption_row", "read_captions"]


@dataclass(frozen=True)
class CaptionRecord:
    """One image and its captions (at least one)."""

    image: Path
    captions: tuple[str, ...]
    source: str = ""  # "file.jsonl:12" of the image's first row

    def as_image(self) -> ImageRecord:
        return ImageRecord(self.image, None, None, self.source)


@dataclass
class CaptionSet:
    """The images of a captions file, each with its captions, in order of first appearance."""

    path: Path | None
    records: list[CaptionRecord]
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_captions(self) -> int:
        return sum(len(r.captions) for r in self.records)

    def images(self) -> list[ImageRecord]:
        return [r.as_image() for r in self.records]

    def flat_captions(self) -> tuple[list[str], list[int]]:
        """Every caption, and the index of its image (the Flickr30k / COCO evaluation's queries)."""
        texts, owners = [], []
        for i, rec in enumerate(self.records):
            texts.extend(rec.captions)
            owners.extend([i] * len(rec.captions))
        return texts, owners

    def subset(self, keep: Iterable[int]) -> CaptionSet:
        return CaptionSet(self.path, [self.records[i] for i in keep], self.problems)


def parse_caption_row(line: str, *, root: Path, where: str) -> tuple[Path, list[str]]:
    """One JSONL line → ``(image path, captions)``; every problem raises naming ``where``."""
    obj = json_object(line)
    if isinstance(obj, str):
        raise VembedError(f"{where}: {obj}")
    if "image" not in obj and "query" in obj and "positive" in obj:
        obj = _factory_row(obj)
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise VembedError(f"{where}: {'missing' if image in (None, '') else 'non-string'} field 'image'")
    has_text, has_list = "text" in obj, "captions" in obj
    if has_text == has_list:
        raise VembedError(
            f"{where}: a captioned image needs 'text' (one caption) or 'captions' (a list), "
            + ("not both" if has_text else "got neither")
        )
    if has_text:
        captions = [obj["text"]]
        names = ["'text'"]
    else:
        if not isinstance(obj["captions"], list) or not obj["captions"]:
            raise VembedError(f"{where}: 'captions' must be a non-empty list of strings")
        captions = obj["captions"]
        names = [f"'captions'[{i}]" for i in range(len(captions))]
    for name, caption in zip(names, captions, strict=True):
        if not isinstance(caption, str):
            shown = json.dumps(caption)[:40]
            raise VembedError(
                f"{where}: caption {name} must be a string, got {type(caption).__name__} {shown}"
            )
        if not caption.strip():
            raise VembedError(f"{where}: caption {name} is empty")
    return resolve_path(image, root), [c.strip() for c in captions]


def _factory_row(obj: dict) -> dict:
    """vembed-factory's t2i rows ``{"query": text, "positive": image}`` (and i2t, the other way round)."""
    query, positive = obj["query"], obj["positive"]
    if isinstance(query, str) and _suffix(query) in IMAGE_EXTENSIONS:
        return {"image": query, "text": positive}
    return {"image": positive, "text": query}


def read_captions(
    path: str | Path, *, image_root: str | Path | None = None, skip_bad: bool = False
) -> CaptionSet:
    """Read a captions JSONL file; ``skip_bad`` counts bad rows (``problems``) instead of raising."""
    path = Path(path)
    if not path.is_file():
        raise VembedError(f"{path}: no such captions file")
    root = Path(image_root) if image_root is not None else path.parent
    by_image: dict[Path, tuple[list[str], str]] = {}
    problems: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                image, captions = parse_caption_row(line, root=root, where=where)
            except VembedError as exc:
                if not skip_bad:
                    raise
                problems.append(str(exc))
                continue
            if image in by_image:
                by_image[image][0].extend(captions)
            else:
                by_image[image] = (list(captions), where)
    if not by_image and not problems:
        raise VembedError(f"{path}: no records (the file is empty)")
    records = [CaptionRecord(image, tuple(caps), where) for image, (caps, where) in by_image.items()]
    return CaptionSet(path, records, problems)
