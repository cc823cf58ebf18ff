"""Stanford Online Products (Song et al. 2016): 120,053 images of 22,634 products in 12 categories.

Reads the official lists ``Ebay_train.txt`` / ``Ebay_test.txt`` (``image_id class_id super_class_id
path``, paths relative to the lists' folder). ``train.jsonl`` and ``val.jsonl`` come from the
official *train* split, val holding out whole products (so checkpoints are never chosen on test);
``test.jsonl`` is the official test split (11,316 products, 60,502 images), the one ``vembed eval
sop`` scores. Records carry ``label`` (the product id) and ``category`` (``bicycle``, ``chair``, ...).
"""

from __future__ import annotations

from pathlib import Path

from vembed.console import log as console_log
from vembed.data.prepare import download
from vembed.data.prepare.output import PrepareResult, clean_records, write_prepared
from vembed.data.prepare.problems import ProblemLog
from vembed.data.prepare.splits import hold_out_classes
from vembed.data.prepare.summary import Provenance
from vembed.data.prepare.validate import CheckOptions
from vembed.data.records import ImageRecord
from vembed.errors import VembedError

KAGGLE_SLUG = "liucong12601/stanford-online-products-dataset"
TRAIN_LIST = "Ebay_train.txt"
TEST_LIST = "Ebay_test.txt"


def prepare_sop(
    root: str | Path | None = None,
    out: str | Path = "data/sop",
    *,
    seed: int = 0,
    val_classes_ratio: float = 0.1,
    check: CheckOptions = CheckOptions(),
) -> PrepareResult:
    """Write ``train/val/test.jsonl`` and ``summary.json`` for SOP into ``out``.

    ``root``: an extracted copy (any folder with ``Ebay_train.txt`` up to four levels down);
    without it the Kaggle copy is downloaded with kagglehub. ``val_classes_ratio`` of the training
    products (with 2+ images, in proportion in every category) form ``val.jsonl``; 0 writes no val.
    """
    if not 0 <= val_classes_ratio < 1:
        raise VembedError(f"--val-classes must be in [0, 1), got {val_classes_ratio}")
    folder = locate_sop(root)
    console_log(f"Stanford Online Products from {folder}")
    log = ProblemLog()
    train = read_ebay_list(folder / TRAIN_LIST, log)
    test = read_ebay_list(folder / TEST_LIST, log)
    kept = clean_records(train + test, log, check)
    good = {id(rec) for rec in kept}
    train = [rec for rec in train if id(rec) in good]
    test = [rec for rec in test if id(rec) in good]
    splits = {"train": train}
    if val_classes_ratio > 0:
        splits["train"], splits["val"] = hold_out_classes(
            train, ratio=val_classes_ratio, seed=seed, by_category=True
        )
    splits["test"] = test
    return write_prepared(
        out,
        Provenance(
            "sop", str(folder.absolute()), seed, {"val_classes_ratio": val_classes_ratio, **check.recorded()}
        ),
        records=kept,
        splits=splits,
        log=log,
    )


def locate_sop(root: str | Path | None) -> Path:
    """The folder holding ``Ebay_train.txt`` and ``Ebay_test.txt`` (downloaded when ``root`` is None)."""
    if root is None:
        root = download.kaggle_download(KAGGLE_SLUG)
    root = Path(root)
    if not root.is_dir():
        raise VembedError(f"SOP root not found: {root}")
    return download.require_dir_containing(
        root, TRAIN_LIST, TEST_LIST, shown=f"{TRAIN_LIST} and {TEST_LIST}", layout="Stanford_Online_Products"
    )


def read_ebay_list(path: Path, log: ProblemLog) -> list[ImageRecord]:
    """Parse an official list; malformed lines are logged as ``bad-record`` with ``file:line``."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            fields = line.split()
            where = f"{path}:{lineno}"
            if not fields or (lineno == 1 and fields[0] == "image_id"):
                continue
            if len(fields) != 4:
                log.add(
                    "bad-record",
                    where,
                    f"expected 'image_id class_id super_class_id path', got {line.strip()!r}",
                )
                continue
            _, class_id, super_id, rel = fields
            if not (class_id.isdigit() and super_id.isdigit()):
                log.add(
                    "bad-record", where, f"class_id and super_class_id must be integers, got {line.strip()!r}"
                )
                continue
            records.append(ImageRecord(path.parent / rel, int(class_id), category_of(rel, super_id), where))
    if not records and not len(log):
        raise VembedError(f"{path}: no images listed")
    return records


def category_of(rel_path: str, super_class_id: str) -> str:
    """``bicycle_final/111085122871_0.JPG`` → ``bicycle`` (the folder names the super-category)."""
    folder = rel_path.replace("\\", "/").split("/")[0] if "/" in rel_path or "\\" in rel_path else ""
    return folder.removesuffix("_final") if folder else f"super_{super_class_id}"
