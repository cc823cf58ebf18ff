"""`vembed prepare imagefolder`: class folders, split folders, holdout classes, Kaggle download."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import kagglehub
import pytest
from conftest import class_image
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.prepare import prepare_imagefolder
from vembed.data.prepare.validate import CheckOptions
from vembed.data.records import read_records
from vembed.errors import VembedError


def make_tree(root: Path, sizes: dict[str, int], start: int = 0) -> Path:
    for c, (name, n) in enumerate(sizes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            class_image(c, start + i, size=12).save(root / name / f"{start + i:03d}.png")
    return root


def per_class(path: Path) -> Counter:
    return Counter(json.loads(line)["label"] for line in path.read_text().splitlines())


def test_class_folders_split_stratified(tmp_path):
    root = make_tree(tmp_path / "cotton", {"healthy": 20, "blight": 20, "curl": 20, "spot": 20})
    result = prepare_imagefolder(root, tmp_path / "out", val_ratio=0.1, test_ratio=0.2)
    assert per_class(result.files["val"]) == {"healthy": 2, "blight": 2, "curl": 2, "spot": 2}
    assert per_class(result.files["test"]) == {"healthy": 4, "blight": 4, "curl": 4, "spot": 4}
    assert per_class(result.files["train"]) == {"healthy": 14, "blight": 14, "curl": 14, "spot": 14}
    all_paths = [rec.image for f in result.files.values() for rec in read_records(f).records]
    assert len(all_paths) == len(set(all_paths)) == 80


def test_existing_split_folders_are_kept_and_missing_val_is_carved_from_train(tmp_path):
    root = tmp_path / "ds"
    make_tree(root / "train", {"a": 10, "b": 10})
    make_tree(root / "test", {"a": 3, "b": 3}, start=100)
    result = prepare_imagefolder(root, tmp_path / "out", val_ratio=0.2, test_ratio=0.5)
    test = read_records(result.files["test"]).records
    assert sorted(rec.image.name for rec in test) == sorted([f"{100 + i:03d}.png" for i in range(3)] * 2)
    assert all("/test/" in rec.image.as_posix() for rec in test)
    val = read_records(result.files["val"]).records
    assert all("/train/" in rec.image.as_posix() for rec in val)  # val comes from train, never test
    assert per_class(result.files["val"]) == {"a": 2, "b": 2}
    assert result.summary["options"]["layout"] == "split folders"


def test_all_three_split_folders_respected(tmp_path):
    root = tmp_path / "ds"
    for split, start in (("train", 0), ("valid", 50), ("test", 100)):
        make_tree(root / split, {"x": 4, "y": 4}, start=start)
    result = prepare_imagefolder(root, tmp_path / "out")
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        records = read_records(result.files[split]).records
        assert len(records) == 8 and all(f"/{folder}/" in r.image.as_posix() for r in records)


def test_holdout_classes_are_disjoint_and_seeded(tmp_path):
    root = make_tree(tmp_path / "ds", {f"c{i}": 6 for i in range(10)})
    a = prepare_imagefolder(root, tmp_path / "a", holdout_ratio=0.3, seed=1)
    b = prepare_imagefolder(root, tmp_path / "b", holdout_ratio=0.3, seed=1)
    unseen = set(per_class(a.files["unseen"]))
    assert len(unseen) == 3
    for split in ("train", "val", "test"):
        assert not set(per_class(a.files[split])) & unseen
        assert a.files[split].read_bytes() == b.files[split].read_bytes()


def test_single_image_class_and_loose_images_are_reported(tmp_path):
    root = make_tree(tmp_path / "ds", {"many": 20, "alone": 1})
    class_image(0, 99, size=12).save(root / "loose.png")
    (root / "notes.txt").write_text("not an image")
    result = prepare_imagefolder(root, tmp_path / "out")
    assert result.summary["problems"]["counts"] == {"single-image-class": 1, "unlabelled": 1}
    assert per_class(result.files["train"])["alone"] == 1
    assert "alone" not in per_class(result.files["val"]) and "alone" not in per_class(result.files["test"])
    assert result.summary["single_image_classes"] == 1
    assert "loose.png" not in "".join(p.read_text() for p in result.files.values())


def test_empty_split_is_reported_and_not_written(tmp_path):
    root = make_tree(tmp_path / "ds", {"a": 3, "b": 3})
    result = prepare_imagefolder(root, tmp_path / "out", val_ratio=0.05, test_ratio=0.3)
    assert "val" not in result.files and not (tmp_path / "out" / "val.jsonl").exists()
    assert result.summary["problems"]["counts"] == {"empty-split": 1}
    assert result.summary["splits"]["val"]["file"] is None


def test_corrupt_image_found_with_check_images(tmp_path):
    root = make_tree(tmp_path / "ds", {"a": 5, "b": 5})
    (root / "a" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = prepare_imagefolder(root, tmp_path / "out")  # existence only: not noticed
    assert result.summary["images"] == 10
    with pytest.raises(VembedError, match=r"(?s)1 problem.*bad-image.*\n  cannot decode image .*001.png"):
        prepare_imagefolder(root, tmp_path / "out2", check=CheckOptions(check_images=True))
    assert not (tmp_path / "out2").exists()


def test_kaggle_download_is_unwrapped(tmp_path, monkeypatch):
    download = tmp_path / "kaggle" / "Cotton Disease"
    make_tree(download / "train", {"healthy": 6, "sick": 6})
    make_tree(download / "val", {"healthy": 2, "sick": 2}, start=50)
    asked = []

    def fake(handle, *args, **kwargs):
        asked.append(handle)
        return str(tmp_path / "kaggle")

    monkeypatch.setattr(kagglehub, "dataset_download", fake)
    result = CliRunner().invoke(
        app, ["prepare", "imagefolder", "--kaggle", "someone/cotton-disease", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert asked == ["someone/cotton-disease"]
    assert per_class(tmp_path / "out" / "val.jsonl") == {"healthy": 2, "sick": 2}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["source"].endswith("Cotton Disease")


def test_cli_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["prepare", "imagefolder", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "image folder not found" in result.output
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    result = runner.invoke(
        app, ["prepare", "imagefolder", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "no images in class folders" in result.output
    make_tree(tmp_path / "ok", {"a": 4, "b": 4})
    result = runner.invoke(
        app, ["prepare", "imagefolder", str(tmp_path / "ok"), "--val-ratio", "0.6", "--test-ratio", "0.5"]
    )
    assert result.exit_code == 2 and "sum below 1" in result.output
