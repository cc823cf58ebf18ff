"""ADE20K scene parsing (MIT SceneParsing benchmark, ``ADEChallengeData2016``): 150 classes,
20,210 training and 2,000 validation images.

Its annotations use 0 for "other" and 1-150 for the classes; they are converted once into
``out/masks/`` with 0 → 255 (ignored) and k → k-1, so the masks hold class indices 0-149 as every
vembed mask does. Class names come from the archive's ``objectInfo150`` table. Sources: the official
archive (downloaded into ``out/downloads``), a Kaggle copy (``kaggle=OWNER/NAME``) or an extracted
copy (``root``).
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vembed.console import log as console_log
from vembed.console import progress
from vembed.data.prepare import download
from vembed.data.prepare.output import PrepareResult
from vembed.data.prepare.problems import ProblemLog
from vembed.data.prepare.segmasks import check_pairs, write_seg_prepared
from vembed.data.prepare.summary import Provenance
from vembed.data.prepare.validate import CheckOptions
from vembed.data.records import SegRecord
from vembed.errors import VembedError
from vembed.io import write_image

URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
NUM_CLASSES = 150
SPLITS = {"train": "training", "val": "validation"}


def prepare_ade20k(
    root: str | Path | None = None,
    out: str | Path = "data/ade20k",
    *,
    kaggle: str | None = None,
    seed: int = 0,
    check: CheckOptions = CheckOptions(),
) -> PrepareResult:
    """Write ``train.jsonl``, ``val.jsonl``, converted masks, ``classes.txt`` and ``summary.json``."""
    out = Path(out)
    folder = locate_ade(root, out, kaggle=kaggle)
    console_log(f"ADE20K (SceneParsing) from {folder}")
    names = class_names(folder)
    log = ProblemLog()
    splits = {}
    for split, sub in SPLITS.items():
        images = sorted((folder / "images" / sub).glob("*.jpg"))
        if not images:
            raise VembedError(f"{folder / 'images' / sub}: no .jpg images")
        splits[split] = [
            SegRecord(
                p, out / "masks" / sub / f"{p.stem}.png", str(folder / "annotations" / sub / f"{p.stem}.png")
            )
            for p in images
        ]
    convert_masks([r for recs in splits.values() for r in recs], log, workers=check.workers)
    kept, pixels = check_pairs(
        [r for recs in splits.values() for r in recs],
        log,
        num_classes=NUM_CLASSES,
        check=check,
    )
    good = {rec.image for rec in kept}
    return write_seg_prepared(
        out,
        Provenance(
            "ade20k",
            str(folder.absolute()) if root or kaggle else URL,
            seed,
            {
                "split": "official",
                "labels": "0 (other) → 255, k → k-1",
                **check.recorded(),
            },
        ),
        class_names=names,
        splits={name: [r for r in recs if r.image in good] for name, recs in splits.items()},
        pixel_counts=pixels,
        log=log,
    )


def locate_ade(root: str | Path | None, out: Path, *, kaggle: str | None = None) -> Path:
    """The ``ADEChallengeData2016`` folder (with images/ and annotations/), downloading as needed."""
    base = download.dataset_root(root, kaggle, url=URL, out=out, folder="ADEChallengeData2016", name="ADE20K")
    names = ("images/training", "annotations/training")
    shown = "images/training/ and annotations/training/"
    return download.require_dir_containing(base, *names, shown=shown, layout="ADEChallengeData2016")


def class_names(folder: Path) -> list[str]:
    """The 150 names from ``objectInfo150.txt``/``.csv`` (first synonym of its Name column)."""
    for candidate in ("objectInfo150.txt", "objectInfo150.csv"):
        path = folder / candidate
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        rows = list(
            csv.DictReader(text.splitlines(), delimiter="\t" if "\t" in text.split("\n", 1)[0] else ",")
        )
        try:
            ordered = sorted(rows, key=lambda r: int(r["Idx"]))
            names = [r["Name"].replace(";", ",").split(",")[0].strip() for r in ordered]
        except (KeyError, ValueError, AttributeError):
            raise VembedError(f"{path}: expected columns Idx and Name") from None
        if len(names) != NUM_CLASSES:
            raise VembedError(f"{path}: {len(names)} classes listed, expected {NUM_CLASSES}")
        return names
    console_log(
        f"[yellow]note:[/] no objectInfo150 table in {folder}: classes are named class_1 ... class_150"
    )
    return [f"class_{i}" for i in range(1, NUM_CLASSES + 1)]


def convert_masks(records: list[SegRecord], log: ProblemLog, *, workers: int | None = None) -> None:
    """ADE annotations (``record.source``) → vembed masks (``record.mask``); existing ones are kept."""
    from PIL import Image

    from vembed.data.images import load_mask

    def convert(rec: SegRecord) -> str | None:
        if rec.mask.is_file():
            return None
        if not os.path.isfile(rec.source):
            return None  # check_pairs reports the missing mask
        try:
            raw = load_mask(rec.source)
        except VembedError as exc:
            return str(exc)
        shifted = np.where(raw == 0, 255, raw.astype(np.int16) - 1).astype(np.uint8)
        write_image(rec.mask, Image.fromarray(shifted, "L"))
        return None

    todo = [r for r in records if not r.mask.is_file()]
    if not todo:
        return
    with (
        progress() as bar,
        ThreadPoolExecutor(max_workers=workers or min(16, (os.cpu_count() or 1) + 4)) as pool,
    ):
        task = bar.add_task("converting ADE20K masks", total=len(todo))
        for rec, error in zip(todo, pool.map(convert, todo), strict=True):
            bar.advance(task)
            if error:
                log.add("bad-mask", rec.source, error)
