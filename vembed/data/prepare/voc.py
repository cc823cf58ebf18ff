"""Pascal VOC 2012 segmentation (Everingham et al.): 21 classes (background + 20), 1,464 train and
1,449 val images with masks.

The masks (``SegmentationClass/*.png``) are palette PNGs whose palette indices are the class indices;
they are read as indices (no colours involved) and the 255 border around objects stays 255 (ignored).
``train.jsonl`` and ``val.jsonl`` are the official ``ImageSets/Segmentation`` lists (the published
numbers are validation mIoU). Sources: the official archive (downloaded into ``out/downloads``), a
Kaggle copy (``kaggle=OWNER/NAME``) or an extracted copy (``root``).
"""

from __future__ import annotations

from pathlib import Path

from vembed.console import log as console_log
from vembed.data.prepare import download
from vembed.data.prepare.output import PrepareResult
from vembed.data.prepare.problems import ProblemLog
from vembed.data.prepare.segmasks import check_pairs, write_seg_prepared
from vembed.data.prepare.summary import Provenance
from vembed.data.prepare.validate import CheckOptions
from vembed.data.records import SegRecord
from vembed.errors import VembedError

URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
LISTS = "ImageSets/Segmentation"


def prepare_voc(
    root: str | Path | None = None,
    out: str | Path = "data/voc",
    *,
    kaggle: str | None = None,
    seed: int = 0,
    check: CheckOptions = CheckOptions(),
) -> PrepareResult:
    """Write ``train.jsonl``, ``val.jsonl``, ``classes.txt`` and ``summary.json`` for VOC 2012."""
    out = Path(out)
    folder = locate_voc(root, out, kaggle=kaggle)
    console_log(f"Pascal VOC 2012 from {folder}")
    log = ProblemLog()
    splits = {name: read_list(folder, name) for name in ("train", "val")}
    kept, pixels = check_pairs(
        [r for recs in splits.values() for r in recs],
        log,
        num_classes=len(CLASSES),
        check=check,
    )
    good = {rec.image for rec in kept}
    return write_seg_prepared(
        out,
        Provenance(
            "voc2012",
            str(folder.absolute()) if root or kaggle else URL,
            seed,
            {"split": "official", **check.recorded()},
        ),
        class_names=CLASSES,
        splits={name: [r for r in recs if r.image in good] for name, recs in splits.items()},
        pixel_counts=pixels,
        log=log,
    )


def locate_voc(root: str | Path | None, out: Path, *, kaggle: str | None = None) -> Path:
    """The ``VOC2012`` folder (with JPEGImages/ and SegmentationClass/), downloading as needed."""
    base = download.dataset_root(root, kaggle, url=URL, out=out, folder="VOCtrainval", name="VOC")
    names = ("JPEGImages", "SegmentationClass", LISTS)
    shown = f"JPEGImages/, SegmentationClass/ and {LISTS}/"
    return download.require_dir_containing(base, *names, shown=shown, layout="VOCdevkit/VOC2012")


def read_list(folder: Path, split: str) -> list[SegRecord]:
    path = folder / LISTS / f"{split}.txt"
    if not path.is_file():
        raise VembedError(f"{path}: official {split} list not found")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        name = line.strip()
        if name:
            records.append(
                SegRecord(
                    folder / "JPEGImages" / f"{name}.jpg",
                    folder / "SegmentationClass" / f"{name}.png",
                    f"{path}:{lineno}",
                )
            )
    if not records:
        raise VembedError(f"{path}: no images listed")
    return records
