"""`vembed prepare flowers102` with fake official files (102flowers.tgz, imagelabels.mat, setid.mat)."""

from __future__ import annotations

import io
import json
import tarfile
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import kagglehub
import numpy as np
import pytest
from conftest import class_image
from scipy.io import savemat

from vembed.data.prepare import prepare_flowers102
from vembed.data.prepare.flowers102 import BASE_URL
from vembed.data.records import read_records
from vembed.errors import VembedError

CLASSES, PER_CLASS = 10, 16


def make_official_files(folder: Path, *, extracted: bool = False) -> Path:
    """The three official files (and, with ``extracted``, the jpg/ folder instead of the archive)."""
    folder.mkdir(parents=True, exist_ok=True)
    jpg = folder / "jpg"
    jpg.mkdir(exist_ok=True)
    labels = []
    for i in range(CLASSES * PER_CLASS):  # classes interleaved, as in the real file
        label = i % CLASSES + 1
        labels.append(label)
        class_image(label, i, size=12).save(jpg / f"image_{i + 1:05d}.jpg", "JPEG")
    savemat(folder / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    ids = np.arange(1, len(labels) + 1)
    rank = np.array([i // CLASSES for i in range(len(labels))])  # position of the image in its class
    savemat(
        folder / "setid.mat",
        {
            "trnid": ids[rank < 4][None],
            "valid": ids[(rank >= 4) & (rank < 7)][None],
            "tstid": ids[rank >= 7][None],
        },
    )
    if not extracted:
        with tarfile.open(folder / "102flowers.tgz", "w:gz") as tar:
            tar.add(jpg, arcname="jpg")
        for p in jpg.iterdir():
            p.unlink()
        jpg.rmdir()
    return folder


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serve the official files from memory in place of the network; records the URLs asked for."""
    source = make_official_files(tmp_path / "server")
    files = {BASE_URL + p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    asked: list[str] = []

    def urlopen(url, timeout=None):
        asked.append(url)
        if url not in files:
            raise urllib.error.URLError("not found")
        return FakeResponse(files[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def classes(path: Path) -> set:
    return {row["label"] for row in lines(path)}


def test_download_extract_and_generalisation_splits(tmp_path, server):
    out = tmp_path / "flowers102"
    result = prepare_flowers102(out=out, shots=3)
    assert sorted(server) == sorted(BASE_URL + n for n in ("102flowers.tgz", "imagelabels.mat", "setid.mat"))
    assert (out / "downloads" / "102flowers.tgz").is_file() and (out / "images" / "jpg").is_dir()
    assert list(result.files) == [
        "train",
        "val",
        "test",
        "unseen",
        "seen_support",
        "seen_query",
        "unseen_support",
        "unseen_query",
    ]
    unseen = classes(result.files["unseen"])
    assert len(unseen) == 2  # 20% of 10 classes, held out entirely
    seen = classes(result.files["train"])
    assert len(seen) == 8 and not seen & unseen
    assert classes(result.files["val"]) <= seen and classes(result.files["test"]) <= seen
    test = Counter(row["label"] for row in lines(result.files["test"]))
    assert set(test.values()) <= {4, 5} and sum(test.values()) == round(8 * 16 * 0.3)  # 4.8 per class
    support = Counter(row["label"] for row in lines(result.files["seen_support"]))
    query = Counter(row["label"] for row in lines(result.files["seen_query"]))
    assert support == {c: 3 for c in seen} and query == {c: test[c] - 3 for c in seen}
    assert Counter(row["label"] for row in lines(result.files["unseen_support"])) == {c: 3 for c in unseen}
    assert len(lines(result.files["unseen_query"])) == 2 * (PER_CLASS - 3)
    assert lines(result.files["train"])[0]["image"].startswith("images/jpg/")  # under --out: relative
    assert all(rec.image.is_file() for rec in read_records(result.files["seen_query"]).records)
    assert result.summary["options"]["unseen_classes"] == sorted(unseen)


def test_second_run_reuses_the_download_and_is_byte_identical(tmp_path, server):
    out = tmp_path / "flowers102"
    first = prepare_flowers102(out=out, seed=1)
    snapshot = {name: path.read_bytes() for name, path in first.files.items()}
    server.clear()
    second = prepare_flowers102(out=out, seed=1)
    assert server == []  # nothing fetched again
    assert {name: path.read_bytes() for name, path in second.files.items()} == snapshot
    other = prepare_flowers102(out=tmp_path / "other", seed=2)
    assert classes(other.files["unseen"]) != classes(first.files["unseen"]) or (
        other.files["test"].read_bytes() != first.files["test"].read_bytes()
    )


def test_official_split_for_seen_classes(tmp_path):
    root = make_official_files(tmp_path / "copy", extracted=True)
    result = prepare_flowers102(root, tmp_path / "out", official_split=True, shots=0, holdout_ratio=0.2)
    assert set(result.files) == {"train", "val", "test", "unseen"}
    per_class = Counter(row["label"] for row in lines(result.files["train"]))
    assert set(per_class.values()) == {4} and len(per_class) == 8
    assert set(Counter(row["label"] for row in lines(result.files["val"])).values()) == {3}
    assert set(Counter(row["label"] for row in lines(result.files["test"])).values()) == {9}
    assert lines(result.files["test"])[0]["image"].startswith(str(root))  # local copy: absolute paths


def test_no_holdout_no_unseen_files(tmp_path):
    root = make_official_files(tmp_path / "copy", extracted=True)
    result = prepare_flowers102(root, tmp_path / "out", holdout_ratio=0, shots=2)
    assert set(result.files) == {"train", "val", "test", "seen_support", "seen_query"}


def test_kaggle_mirror_with_official_files(tmp_path, monkeypatch):
    mirror = make_official_files(tmp_path / "kaggle" / "flowers" / "102", extracted=False)
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle, *a, **k: str(tmp_path / "kaggle"))
    result = prepare_flowers102(out=tmp_path / "out", kaggle="someone/oxford-flowers")
    assert result.summary["images"] == CLASSES * PER_CLASS
    assert result.summary["source"] == str(mirror.absolute())


def test_offline_download_is_a_clear_error(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(VembedError, match="could not download .*102flowers.tgz.*--root"):
        prepare_flowers102(out=tmp_path / "out")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no partial download left


def test_missing_labels_file_is_a_clear_error(tmp_path):
    (tmp_path / "copy").mkdir()
    with pytest.raises(VembedError, match="no imagelabels.mat found"):
        prepare_flowers102(tmp_path / "copy", tmp_path / "out")


def test_corrupt_mat_file_names_the_file(tmp_path):
    root = make_official_files(tmp_path / "copy", extracted=True)
    (root / "imagelabels.mat").write_bytes(b"garbage")
    with pytest.raises(VembedError, match="imagelabels.mat: not a readable MATLAB file"):
        prepare_flowers102(root, tmp_path / "out")
