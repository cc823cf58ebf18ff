"""prepare segfolder / voc / ade20k: records, class lists, problems named by file, determinism."""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.images import load_mask
from vembed.data.prepare import download, prepare_ade20k, prepare_segfolder, prepare_voc
from vembed.data.prepare.validate import CheckOptions
from vembed.data.records import read_records
from vembed.data.shapes import write_shapes
from vembed.errors import VembedError


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_segfolder_writes_image_mask_records_classes_and_a_seeded_split(tmp_path):
    root = write_shapes(tmp_path / "shapes", count=20, size=28)
    result = prepare_segfolder(root, tmp_path / "out", seed=1, val_ratio=0.2, test_ratio=0.1)
    rows = {name: read_lines(path) for name, path in result.files.items()}
    assert {name: len(r) for name, r in rows.items()} == {"train": 14, "val": 4, "test": 2}
    assert set(rows["train"][0]) == {"image", "mask"}
    assert (tmp_path / "out" / "classes.txt").read_text().split() == ["background", "square", "disc"]
    summary = result.summary
    assert summary["task"] == "segmentation" and summary["classes"] == 3
    assert summary["pixels_per_class"]["background"] > 0 and summary["ignored_pixels"] > 0
    records = read_records(result.files["val"])
    assert records.is_segmentation and records.masks()[0].mask.is_file()
    again = prepare_segfolder(root, tmp_path / "out2", seed=1, val_ratio=0.2, test_ratio=0.1)
    assert again.files["val"].read_text() == result.files["val"].read_text()
    other = prepare_segfolder(root, tmp_path / "out3", seed=2, val_ratio=0.2, test_ratio=0.1)
    assert other.files["val"].read_text() != result.files["val"].read_text()


def test_segfolder_split_files_and_inferred_classes(tmp_path):
    root = write_shapes(tmp_path / "shapes", count=6, size=28)
    (root / "classes.txt").unlink()
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("0000\n0001\n0002\n0003\n")
    (root / "splits" / "val.txt").write_text("0004\n0005.png\n")
    result = prepare_segfolder(root, tmp_path / "out")
    assert sorted(result.files) == ["train", "val"]
    assert [Path(r["image"]).name for r in read_lines(result.files["val"])] == ["0004.png", "0005.png"]
    assert result.summary["class_names"] == ["0", "1", "2"]


def test_segfolder_problems_are_named_by_file_and_skip_bad_drops_them(tmp_path):
    root = write_shapes(tmp_path / "shapes", count=8, size=28)
    (root / "masks" / "0001.png").unlink()  # an image without a mask
    Image.new("L", (20, 28)).save(root / "masks" / "0002.png")  # size mismatch
    Image.fromarray(np.full((28, 28), 7, np.uint8)).save(root / "masks" / "0003.png")  # class 7 of 3
    Image.new("RGB", (28, 28), (0, 128, 0)).save(root / "masks" / "0004.png")  # colour mask
    with pytest.raises(VembedError) as err:
        prepare_segfolder(root, tmp_path / "out")
    text = str(err.value)
    assert "4 problem(s)" in text and "nothing was written" in text
    assert "no mask for" in text and "0001.png" in text
    assert "0002.png is 20x28 but its image" in text
    assert "0003.png holds class index 7 but there are 3 classes" in text
    assert "0004.png: the mask is a RGB image (colours, not class indices)" in text
    assert not (tmp_path / "out").exists()
    result = prepare_segfolder(
        root, tmp_path / "out", check=CheckOptions(skip_bad=True), val_ratio=0, test_ratio=0
    )
    assert len(read_lines(result.files["train"])) == 4
    assert result.summary["problems"]["counts"] == {"missing-mask": 1, "bad-mask": 3}
    assert (tmp_path / "out" / "problems.txt").is_file()


def test_cli_prepare_segfolder(tmp_path):
    root = write_shapes(tmp_path / "shapes", count=10, size=28)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["prepare", "segfolder", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "train.jsonl").is_file() and (out / "summary.json").is_file()
    bad = CliRunner().invoke(app, ["prepare", "segfolder", str(tmp_path / "nowhere"), "--out", str(out)])
    assert bad.exit_code == 2 and "no images/ folder" in bad.output


VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)


def make_voc(base: Path, names=("2007_000032", "2007_000033", "2007_000039")) -> Path:
    voc = base / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (30, 20), (i * 50, 80, 120)).save(voc / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros((20, 30), np.uint8)
        mask[5:15, 5:20] = 15  # person
        mask[4, 5:20] = 255  # the ignored border
        img = Image.fromarray(mask, "P")
        img.putpalette(VOC_PALETTE)
        img.save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(names[:2]) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text(names[2] + "\n")
    return base


def test_voc_from_root_reads_palette_masks_as_indices_and_keeps_255(tmp_path):
    result = prepare_voc(make_voc(tmp_path / "voc"), tmp_path / "out")
    assert sorted(result.files) == ["train", "val"]
    assert result.summary["classes"] == 21 and result.summary["class_names"][15] == "person"
    rec = read_records(result.files["val"]).masks()[0]
    mask = load_mask(rec.mask)
    assert set(np.unique(mask)) == {0, 15, 255}


def test_voc_downloads_the_official_archive_when_no_root(tmp_path, monkeypatch):
    archive_src = make_voc(tmp_path / "src")
    tar_path = tmp_path / "VOCtrainval_11-May-2012.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(archive_src / "VOCdevkit", arcname="VOCdevkit")
    urls = []

    def fake_download(url, dest, **_):
        urls.append(url)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(tar_path.read_bytes())
        return Path(dest)

    monkeypatch.setattr(download, "download_url", fake_download)
    result = prepare_voc(None, tmp_path / "out")
    assert urls == ["http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"]
    assert len(read_lines(result.files["train"])) == 2


def test_voc_from_kaggle_uses_kagglehub(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "kaggle_download", lambda slug: make_voc(tmp_path / slug.replace("/", "_")))
    result = prepare_voc(None, tmp_path / "out", kaggle="someone/voc2012")
    assert len(read_lines(result.files["val"])) == 1


def make_ade(base: Path) -> Path:
    ade = base / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.new("RGB", (24, 16), (10, 20, 30)).save(ade / "images" / split / f"{name}.jpg")
            ann = np.zeros((16, 24), np.uint8)
            ann[:8] = 1  # wall
            ann[8:, :4] = 150  # the last class
            Image.fromarray(ann, "L").save(ade / "annotations" / split / f"{name}.png")
    rows = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i}\t0.1\t1\t1\tname{i};syn" for i in range(1, 151)]
    (ade / "objectInfo150.txt").write_text("\n".join(rows) + "\n")
    return base


def test_ade20k_shifts_labels_other_becomes_ignore(tmp_path):
    result = prepare_ade20k(make_ade(tmp_path / "ade"), tmp_path / "out")
    assert result.summary["classes"] == 150
    assert result.summary["class_names"][:2] == ["name1", "name2"]
    rec = read_records(result.files["train"]).masks()[0]
    mask = load_mask(rec.mask)
    assert mask[0, 0] == 0 and mask[15, 0] == 149 and mask[15, 10] == 255
    assert rec.mask.is_relative_to((tmp_path / "out").absolute())


def test_ade20k_downloads_the_official_zip_when_no_root(tmp_path, monkeypatch):
    src = make_ade(tmp_path / "src")
    zip_path = tmp_path / "ADEChallengeData2016.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted((src / "ADEChallengeData2016").rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src))
    urls = []

    def fake_download(url, dest, **_):
        urls.append(url)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(zip_path.read_bytes())
        return Path(dest)

    monkeypatch.setattr(download, "download_url", fake_download)
    result = prepare_ade20k(None, tmp_path / "out")
    assert urls == ["http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"]
    assert len(read_lines(result.files["val"])) == 2
