"""Any ``class_name/image.ext`` tree (ImageFolder layout), local or fetched from Kaggle.

The first folder level below the root names the class; images may sit deeper inside it. When the
root holds ``train/`` (and maybe ``val/``, ``test/``) folders, each with class folders, those splits
are kept as they are and only a missing val or test is carved from train.
"""

from __future__ import annotations

from pathlib import Path

from vembed.console import log as console_log
from vembed.data.prepare import download
from vembed.data.prepare.output import PrepareResult, clean_records, write_prepared
from vembed.data.prepare.problems import ProblemLog
from vembed.data.prepare.splits import SplitOptions, make_splits
from vembed.data.prepare.summary import Provenance
from vembed.data.prepare.validate import CheckOptions
from vembed.data.records import IMAGE_EXTENSIONS, ImageRecord
from vembed.errors import VembedError

SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}


def prepare_imagefolder(
    root: str | Path | None = None,
    out: str | Path | None = None,
    *,
    kaggle: str | None = None,
    seed: int = 0,
    val_ratio: float = 0.1,
    test_ratio: float = 0.1,
    holdout_ratio: float = 0.0,
    shots: int = 0,
    check: CheckOptions = CheckOptions(),
) -> PrepareResult:
    """Write stratified splits of an ImageFolder tree into ``out`` (labels are the class folder names).

    ``root``: the tree; with ``kaggle`` (``OWNER/NAME``) the data set is downloaded with kagglehub and
    ``root``, if given, is a folder inside it. ``holdout_ratio`` of the classes go whole to
    ``unseen.jsonl``; ``shots`` > 0 also writes k-shot support/query files.
    """
    if out is None:
        raise VembedError("prepare imagefolder needs an output folder (--out)")
    base = locate_tree(root, kaggle=kaggle)
    console_log(f"image folder {base}")
    log = ProblemLog()
    layout = split_folders(base)
    predefined = None
    if layout:
        console_log("found " + ", ".join(f"{name}/" for name in layout.values()) + ": keeping those splits")
        scanned = {split: scan_classes(base / folder, log) for split, folder in layout.items()}
        predefined = {split: recs for split, recs in scanned.items() if recs}
        if "train" not in predefined:
            raise VembedError(f"{base / layout['train']}: no images in class folders")
        records = [rec for recs in predefined.values() for rec in recs]
    else:
        records = scan_classes(base, log)
    if not records:
        raise VembedError(
            f"{base}: no images in class folders (expected {base}/<class>/<image>, "
            f"extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    kept = clean_records(records, log, check)
    if predefined is not None:
        good = {id(rec) for rec in kept}
        predefined = {name: [r for r in recs if id(r) in good] for name, recs in predefined.items()}
    splitting = SplitOptions(seed, val_ratio, test_ratio, holdout_ratio, shots)
    splits = make_splits(kept, splitting, log=log, predefined=predefined)
    options = {
        "kaggle": kaggle,
        "layout": "split folders" if layout else "class folders",
        "val_ratio": val_ratio,
        "test_ratio": test_ratio,
        "holdout_ratio": holdout_ratio,
        "shots": shots,
        **check.recorded(),
    }
    return write_prepared(
        out,
        Provenance(
            f"kaggle:{kaggle}" if kaggle else f"imagefolder:{base.name}", str(base.absolute()), seed, options
        ),
        records=kept,
        splits=splits,
        log=log,
    )


def locate_tree(root: str | Path | None, *, kaggle: str | None = None) -> Path:
    """The tree's root: ``root``, or inside a Kaggle download (descending through lone wrapper folders)."""
    if kaggle is not None:
        base = download.kaggle_download(kaggle)
        if root is not None:
            base = base / root
    elif root is None:
        raise VembedError("give a folder of class folders, or --kaggle OWNER/NAME")
    else:
        base = Path(root)
    if not base.is_dir():
        raise VembedError(f"image folder not found: {base}")
    return unwrap(base)


def unwrap(folder: Path) -> Path:
    """Descend while a folder holds nothing but one subfolder (archives often wrap the tree so)."""
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir() and not split_folders(folder):
            folder = entries[0]
        else:
            return folder


def split_folders(base: Path) -> dict[str, str]:
    """``{"train": "train", "val": "valid", ...}`` for the split folders under ``base`` (needs train)."""
    names = {p.name.lower(): p.name for p in base.iterdir() if p.is_dir()}
    found = {}
    for split, aliases in SPLIT_FOLDERS.items():
        for alias in aliases:
            if alias in names:
                found[split] = names[alias]
                break
    return found if "train" in found else {}


def scan_classes(folder: Path, log: ProblemLog) -> list[ImageRecord]:
    """Every image under ``folder``'s class folders, sorted; images outside a class folder are logged.

    A split folder of loose, unlabelled images (a competition's test set) gives no records.
    """
    records = []
    loose = 0
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            loose += 1
        elif path.is_dir():
            images = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            records.extend(ImageRecord(p, path.name, None, str(p)) for p in images)
    if loose:
        log.add("unlabelled", str(folder), f"{loose} image(s) outside any class folder: ignored")
    return records
