"""Any segmentation set laid out as ``ROOT/images/NAME.{jpg,png}`` + ``ROOT/masks/NAME.png``.

Masks are one channel, pixel = class index, 255 = ignore. Optional ``ROOT/classes.txt`` (one class
name a line, the first naming class 0) and ``ROOT/splits/{train,val,test}.txt`` (one NAME a line);
without split files, a seeded split by ratio.
"""

from __future__ import annotations

from pathlib import Path

from vembed.console import log as console_log
from vembed.data.prepare.output import PrepareResult
from vembed.data.prepare.problems import ProblemLog
from vembed.data.prepare.segmasks import (
    check_pairs,
    infer_class_names,
    read_class_names,
    write_seg_prepared,
)
from vembed.data.prepare.splits import SPLITS, check_ratios, seeded
from vembed.data.prepare.summary import Provenance
from vembed.data.prepare.validate import CheckOptions
from vembed.data.records import IMAGE_EXTENSIONS, SegRecord
from vembed.errors import VembedError


def prepare_segfolder(
    root: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    val_ratio: float = 0.1,
    test_ratio: float = 0.1,
    check: CheckOptions = CheckOptions(),
) -> PrepareResult:
    """Write ``train/val/test.jsonl`` of image/mask records, ``classes.txt`` and ``summary.json``."""
    check_ratios(val_ratio=val_ratio, test_ratio=test_ratio)
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise VembedError(
                f"{root}: no {folder.name}/ folder; expected ROOT/images/NAME.jpg and ROOT/masks/NAME.png"
            )
    console_log(f"segmentation folder {root}")
    log = ProblemLog()
    records = scan_pairs(images_dir, masks_dir, log)
    if not records:
        raise VembedError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    names = read_class_names(root / "classes.txt") if (root / "classes.txt").is_file() else None
    predefined = read_split_files(root / "splits", records, log)
    kept, pixels = check_pairs(
        records,
        log,
        num_classes=len(names) if names else None,
        check=check,
    )
    if names is None:
        names = infer_class_names(pixels)
        console_log(f"no classes.txt: {len(names)} classes named by index (0-{len(names) - 1})")
    good = {rec.image for rec in kept}
    if predefined is not None:
        splits = {name: [r for r in recs if r.image in good] for name, recs in predefined.items()}
    else:
        splits = split_by_ratio(kept, val_ratio=val_ratio, test_ratio=test_ratio, seed=seed)
    options = {
        "splits": "split files"
        if predefined is not None
        else {"val_ratio": val_ratio, "test_ratio": test_ratio},
        "class_list": "classes.txt" if (root / "classes.txt").is_file() else "inferred",
        **check.recorded(),
    }
    return write_seg_prepared(
        out,
        Provenance(f"segfolder:{root.absolute().name}", str(root.absolute()), seed, options),
        class_names=names,
        splits=splits,
        pixel_counts=pixels,
        log=log,
    )


def scan_pairs(images_dir: Path, masks_dir: Path, log: ProblemLog) -> list[SegRecord]:
    """One record per image (sorted by name), its mask ``masks/<stem>.png`` (checked later)."""
    images = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    stems = [p.stem for p in images]
    duplicated = {s for s in stems if stems.count(s) > 1}
    records = []
    for path in images:
        if path.stem in duplicated:
            log.add("bad-record", str(path), f"two images are named {path.stem} (one mask name for both)")
            continue
        records.append(SegRecord(path, masks_dir / f"{path.stem}.png", ""))
    unpaired = sorted(p for p in masks_dir.glob("*.png") if p.stem not in set(stems))
    for mask in unpaired:
        log.add("unpaired-mask", str(mask), "a mask without an image: ignored")
    return records


def read_split_files(
    folder: Path, records: list[SegRecord], log: ProblemLog
) -> dict[str, list[SegRecord]] | None:
    """``splits/{train,val,test}.txt`` → records per split (None when there is no split file)."""
    files = {name: folder / f"{name}.txt" for name in SPLITS if (folder / f"{name}.txt").is_file()}
    if not files:
        return None
    if "train" not in files:
        raise VembedError(
            f"{folder}: split files need a train.txt (found {', '.join(p.name for p in files.values())})"
        )
    by_name = {rec.image.stem: rec for rec in records}
    out: dict[str, list[SegRecord]] = {}
    for split, path in files.items():
        out[split] = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            name = Path(line.strip()).stem
            if not name:
                continue
            rec = by_name.get(name)
            if rec is None:
                log.add("missing-image", f"{path}:{lineno}", f"no image named {name} in images/")
                continue
            out[split].append(SegRecord(rec.image, rec.mask, f"{path}:{lineno}"))
    listed = {r.image for recs in out.values() for r in recs}
    left = len(records) - len(listed)
    if left:
        console_log(f"{left} image(s) are in no split file: left out")
    return out


def split_by_ratio(
    records: list[SegRecord], *, val_ratio: float, test_ratio: float, seed: int
) -> dict[str, list[SegRecord]]:
    """Seeded train/val/test by share of images; each split keeps the input (name) order."""
    order = list(range(len(records)))
    seeded(seed, "segfolder").shuffle(order)
    n = len(records)
    n_test = min(round(n * test_ratio), max(n - 1, 0))
    n_val = min(round(n * val_ratio), max(n - 1 - n_test, 0))
    where = {}
    for pos, i in enumerate(order):
        where[i] = "test" if pos < n_test else "val" if pos < n_test + n_val else "train"
    wanted = ["train", *(["val"] if val_ratio > 0 else []), *(["test"] if test_ratio > 0 else [])]
    return {name: [r for i, r in enumerate(records) if where[i] == name] for name in wanted}
