"""Captioned images for ``train.task=image_text``: Flickr30k and COCO (Karpathy splits), and your own
JSONL / CSV with a caption column (``--text-key``).

Every split is written as ``{"image": ..., "captions": [...]}`` rows (one per image, every caption of
it), with ``summary.json``. The Karpathy split files (``dataset_flickr30k.json``, ``dataset_coco.json``:
``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}, ...]}]}``) say which images are
train / val / test: Flickr30k 29,000 / 1,014 / 1,000; COCO 113,287 (train + restval) / 5,000 / 5,000
(the 5k test of the papers). Image paths are relative to ``out`` when the images live under it.
"""

from __future__ import annotations

import json
import os
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vembed.console import log
from vembed.data.prepare import download
from vembed.data.records import parse_each
from vembed.errors import VembedError
from vembed.io import write_json, write_jsonl

KARPATHY_SLUG = (
    "shtvkumar/karpathy-splits"  # dataset_flickr30k.json, dataset_coco.json, dataset_flickr8k.json
)
FLICKR_IMAGES_SLUG = "hsankesara/flickr-image-dataset"
COCO_IMAGES_SLUG = "awsaf49/coco-2017-dataset"  # hint only: COCO 2014 images are needed (train2014/val2014)
SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@dataclass
class CaptionsResult:
    """What a captions prepare wrote: split → file, and images / captions per split."""

    out: Path
    files: dict[str, Path]
    counts: dict[str, dict[str, int]]
    problems: list[str] = field(default_factory=list)

    @property
    def summary_path(self) -> Path:
        return self.out / "summary.json"


def prepare_flickr30k(root=None, out="data/flickr30k", *, splits_file=None, skip_bad=False) -> CaptionsResult:
    """Flickr30k with the Karpathy splits; ``root``: a folder with the images and
    ``dataset_flickr30k.json`` (default: both fetched with kagglehub)."""
    return _prepare_karpathy("flickr30k", root, out, splits_file, FLICKR_IMAGES_SLUG, skip_bad)


def prepare_coco_captions(root=None, out="data/coco", *, splits_file=None, skip_bad=False) -> CaptionsResult:
    """COCO captions with the Karpathy splits (the 5k test); ``root`` holds ``train2014/`` and
    ``val2014/`` and ``dataset_coco.json`` (or pass ``splits_file``)."""
    if root is None:
        raise VembedError(
            "prepare coco-captions needs --root: a folder with COCO 2014's train2014/ and val2014/ images "
            "(and dataset_coco.json, or --splits FILE)"
        )
    return _prepare_karpathy("coco", root, out, splits_file, None, skip_bad)


def _prepare_karpathy(name, root, out, splits_file, images_slug, skip_bad) -> CaptionsResult:
    json_name = f"dataset_{name}.json"
    if root is None:
        root = download.kaggle_download(images_slug)
    root = Path(root)
    if not root.is_dir():
        raise VembedError(f"{name} root not found: {root}")
    if splits_file is None:
        folder = download.find_dir_containing(root, json_name)
        if folder is None:
            folder = download.find_dir_containing(download.kaggle_download(KARPATHY_SLUG), json_name)
        if folder is None:
            raise VembedError(f"{root}: no {json_name} (the Karpathy splits); pass --splits FILE")
        splits_file = folder / json_name
    entries = _karpathy_entries(Path(splits_file))
    log(f"{name}: {len(entries):,} images listed in {splits_file}")
    images_dir = _images_dir(root, entries[0])
    splits: dict[str, list[tuple[Path, list[str]]]] = {"train": [], "val": [], "test": []}
    problems = []
    for where, entry in entries:
        path = images_dir / entry.get("filepath", "") / entry["filename"]
        if not path.is_file():
            problems.append(f"{where}: image not found: {path}")
            continue
        splits[SPLIT_NAMES[entry["split"]]].append((path, entry["captions"]))
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VembedError(f"{problems[0]}{more}; --skip-bad leaves them out")
    return write_caption_splits(out, splits, dataset=name, source=str(root.absolute()), problems=problems)


def _karpathy_entries(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, {"filename", "filepath"?, "split", "captions"})`` of a Karpathy split file, checked."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise VembedError(f"{path}: not a readable Karpathy split file ({exc})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images:
        raise VembedError(f"{path}: expected {{'images': [...]}} (a Karpathy split file)")
    out = []
    for i, item in enumerate(images):
        where = f"{path}: images[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
            raise VembedError(f"{where}: needs a 'filename'")
        if item.get("split") not in SPLIT_NAMES:
            raise VembedError(f"{where}: split {item.get('split')!r} is not one of {', '.join(SPLIT_NAMES)}")
        captions = [s.get("raw", "").strip() for s in item.get("sentences", []) if isinstance(s, dict)]
        captions = [c for c in captions if c]
        if not captions:
            raise VembedError(f"{where}: no caption (sentences[].raw)")
        out.append((where, {**item, "captions": captions}))
    return out


def _images_dir(root: Path, first: tuple[str, dict]) -> Path:
    """The folder under ``root`` (four levels down at most) holding the first listed image."""
    entry = first[1]
    relative = Path(entry.get("filepath", "")) / entry["filename"]
    queue = deque([(root, 0)])
    while queue:
        folder, depth = queue.popleft()
        if (folder / relative).is_file():
            return folder
        if depth < 4:
            with os.scandir(folder) as entries:
                queue.extend(
                    (Path(e.path), depth + 1) for e in sorted(entries, key=lambda e: e.name) if e.is_dir()
                )
    raise VembedError(f"{root}: cannot find the images (looked for {relative} four levels down)")


def prepare_caption_table(
    file: str | Path,
    out: str | Path,
    *,
    fmt: str,
    image_key: str = "image",
    text_key: str = "text",
    split_key: str | None = "split",
    image_root: str | Path | None = None,
    delimiter: str | None = None,
    val_ratio: float = 0.1,
    test_ratio: float = 0.1,
    seed: int = 0,
    skip_bad: bool = False,
) -> CaptionsResult:
    """Your JSONL / CSV rows with an image and a caption column (several rows per image are merged),
    split by image (seeded) unless a ``split`` column says where each goes."""
    from vembed.data.prepare.tabular import SPLIT_ALIASES, _csv_rows, _jsonl_rows

    file = Path(file)
    if not file.is_file():
        raise VembedError(f"{file}: no such file")
    root = Path(image_root) if image_root is not None else file.parent
    rows = _jsonl_rows(file) if fmt == "jsonl" else _csv_rows(file, delimiter, {"--text-key": text_key})

    def parse(item: tuple[int, dict | str]) -> tuple[Path, str, dict]:
        where, row = f"{file}:{item[0]}", item[1]
        if isinstance(row, str):
            raise VembedError(f"{where}: {row}")
        image, text = row.get(image_key), row.get(text_key)
        if not isinstance(image, str) or not image.strip():
            raise VembedError(f"{where}: missing image field '{image_key}'")
        if not isinstance(text, str) or not text.strip():
            raise VembedError(f"{where}: caption field '{text_key}' is missing, empty or not text")
        path = Path(image) if Path(image).is_absolute() else root / image
        if not path.is_file():
            raise VembedError(f"{where}: image not found: {path}")
        return path, text, row

    by_image: dict[Path, list[str]] = {}
    given: dict[Path, str] = {}
    parsed, problems = parse_each(rows, parse, skip_bad=skip_bad)
    for path, text, row in parsed:
        by_image.setdefault(path, []).append(text.strip())
        split = row.get(split_key) if split_key else None
        if isinstance(split, str) and split.strip().lower() in SPLIT_ALIASES:
            given[path] = SPLIT_ALIASES[split.strip().lower()]
    if not by_image:
        raise VembedError(f"{file}: no usable rows")
    images = list(by_image)
    rest = [p for p in images if p not in given]
    random.Random(seed).shuffle(rest)
    n_val, n_test = round(len(rest) * val_ratio), round(len(rest) * test_ratio)
    assigned = dict(given)
    assigned.update({p: "val" for p in rest[:n_val]})
    assigned.update({p: "test" for p in rest[n_val : n_val + n_test]})
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for path in images:
        splits[assigned.get(path, "train")].append((path, by_image[path]))
    return write_caption_splits(
        out, splits, dataset=file.name, source=str(file.absolute()), problems=problems
    )


def write_caption_splits(out, splits: dict[str, list], *, dataset: str, source: str, problems: list[str]):
    """``<split>.jsonl`` (``{"image", "captions"}``) for every non-empty split, and ``summary.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    out_abs = os.path.abspath(out)
    files, counts = {}, {}
    for name, items in splits.items():
        if not items:
            continue
        rows = []
        for path, captions in items:
            image = os.path.abspath(path)
            if image.startswith(out_abs.rstrip(os.sep) + os.sep):
                image = os.path.relpath(image, out_abs)
            rows.append({"image": Path(image).as_posix(), "captions": list(captions)})
        files[name] = write_jsonl(out / f"{name}.jsonl", rows)
        counts[name] = {"images": len(items), "captions": sum(len(c) for _, c in items)}
    if not files:
        raise VembedError(f"{dataset}: every split is empty; nothing to write")
    summary = {"dataset": dataset, "source": source, "task": "image_text", "splits": counts}
    summary["files"] = sorted([f"{n}.jsonl" for n in files] + ["summary.json"])
    summary["problems"] = problems[:100]
    write_json(out / "summary.json", summary)
    return CaptionsResult(out, files, counts, problems)
