"""Oxford Flowers-102 (Nilsback & Zisserman 2008) with a generalisation protocol: seen and unseen classes.

A ``holdout_ratio`` of the 102 classes is held out entirely (``unseen.jsonl``: never trained on);
the images of the other classes are split by class-stratified ratio (or the official
``setid.mat`` split) into ``train`` / ``val`` / ``test``. For k-shot evaluation the seen test images
and the unseen images are each cut into ``*_support.jsonl`` (``shots`` per class, in an order whose
first k lines per class are the k-shot support for any k ≤ shots) and ``*_query.jsonl`` (the rest).

Sources: the official files (``102flowers.tgz``, ``imagelabels.mat``, ``setid.mat``) downloaded into
``out/downloads``, a local copy (``root``) or a Kaggle mirror holding the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vembed.console import log as console_log
from vembed.data.prepare import download
from vembed.data.prepare.output import PrepareResult, clean_records, write_prepared
from vembed.data.prepare.problems import ProblemLog
from vembed.data.prepare.splits import SplitOptions, make_splits
from vembed.data.prepare.summary import Provenance
from vembed.data.prepare.validate import CheckOptions
from vembed.data.records import ImageRecord
from vembed.errors import VembedError

BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
ARCHIVE = "102flowers.tgz"
LABELS = "imagelabels.mat"
SETID = "setid.mat"


def prepare_flowers102(
    root: str | Path | None = None,
    out: str | Path = "data/flowers102",
    *,
    kaggle: str | None = None,
    seed: int = 0,
    holdout_ratio: float = 0.2,
    val_ratio: float = 0.1,
    test_ratio: float = 0.3,
    official_split: bool = False,
    shots: int = 10,
    check: CheckOptions = CheckOptions(),
) -> PrepareResult:
    """Write the seen/unseen splits and k-shot support/query files for Flowers-102 into ``out``.

    ``shots=0`` writes no support/query files; ``holdout_ratio=0`` holds no class out.
    ``official_split`` splits the seen classes by ``setid.mat`` (trnid/valid/tstid) instead of ratios.
    """
    splitting = SplitOptions(seed, val_ratio, test_ratio, holdout_ratio, shots)
    splitting.check()  # before any download
    out = Path(out)
    folder, images = locate_flowers(root, out, kaggle=kaggle)
    console_log(f"Oxford Flowers-102 from {folder}")
    labels = read_mat_array(folder / LABELS, "labels")
    log = ProblemLog()
    records = [
        ImageRecord(images / f"image_{i:05d}.jpg", int(label), None, f"{folder / LABELS}[{i}]")
        for i, label in enumerate(labels, start=1)
    ]
    kept = clean_records(records, log, check)
    predefined = official_splits(kept, folder / SETID) if official_split else None
    splits = make_splits(kept, splitting, log=log, predefined=predefined)
    options = {
        "holdout_ratio": holdout_ratio,
        "split": "official" if official_split else {"val_ratio": val_ratio, "test_ratio": test_ratio},
        "shots": shots,
        "unseen_classes": sorted({rec.label for rec in splits.get("unseen", [])}),
        **check.recorded(),
    }
    return write_prepared(
        out,
        Provenance("flowers102", str(folder.absolute()) if kaggle or root else BASE_URL, seed, options),
        records=kept,
        splits=splits,
        log=log,
    )


def locate_flowers(root: str | Path | None, out: Path, *, kaggle: str | None = None) -> tuple[Path, Path]:
    """``(folder with imagelabels.mat, folder with image_XXXXX.jpg)``, downloading/extracting as needed."""
    if root is not None and kaggle is not None:
        raise VembedError("give either --root or --kaggle, not both")
    if root is None and kaggle is None:
        folder = out / "downloads"
        for name in (ARCHIVE, LABELS, SETID):
            download.download_url(BASE_URL + name, folder / name)
    else:
        base = Path(root) if root is not None else download.kaggle_download(kaggle)
        if not base.is_dir():
            raise VembedError(f"Flowers-102 root not found: {base}")
        found = download.find_dir_containing(base, LABELS)
        if found is None:
            raise VembedError(
                f"{base}: no {LABELS} found (looked four levels down); expected the official files "
                f"{LABELS}, {SETID} and jpg/ (or {ARCHIVE})"
            )
        folder = found
    if (folder / "jpg").is_dir():
        return folder, folder / "jpg"
    extracted = out / "images"
    if not (extracted / "jpg").is_dir():
        if not (folder / ARCHIVE).is_file():
            raise VembedError(f"{folder}: neither jpg/ nor {ARCHIVE} found beside {LABELS}")
        download.extract_tar(folder / ARCHIVE, extracted)
    if not (extracted / "jpg").is_dir():
        raise VembedError(f"{folder / ARCHIVE}: the archive has no jpg/ folder")
    return folder, extracted / "jpg"


def official_splits(records: list[ImageRecord], setid: Path) -> dict[str, list[ImageRecord]]:
    """Images split by ``setid.mat``'s trnid / valid / tstid (1-based image ids)."""
    ids = {name: set(read_mat_array(setid, key).tolist()) for name, key in _SETID_KEYS.items()}
    splits: dict[str, list[ImageRecord]] = {name: [] for name in _SETID_KEYS}
    for rec in records:
        image_id = int(Path(rec.image).stem.rsplit("_", 1)[-1])
        for name, members in ids.items():
            if image_id in members:
                splits[name].append(rec)
                break
    return splits


_SETID_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}


def read_mat_array(path: Path, key: str) -> np.ndarray:
    """One integer array from a MATLAB file (needs scipy)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise VembedError(f"reading {path.name} needs scipy: pip install scipy") from None
    if not path.is_file():
        raise VembedError(f"{path}: file not found")
    try:
        data = loadmat(path)
    except Exception as exc:  # scipy raises ValueError, MatReadError, OSError ...
        raise VembedError(
            f"{path}: not a readable MATLAB file ({exc}); delete it to download it again"
        ) from None
    if key not in data:
        found = ", ".join(k for k in data if not k.startswith("__"))
        raise VembedError(f"{path}: no '{key}' array (found: {found})")
    return np.asarray(data[key]).ravel().astype(np.int64)
