"""`vembed prepare sop` on a small fake Stanford Online Products tree with the official file layout."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import kagglehub
import pytest
from conftest import class_image
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.prepare import prepare_sop
from vembed.data.prepare.sop import KAGGLE_SLUG
from vembed.data.prepare.validate import CheckOptions
from vembed.data.records import read_records
from vembed.errors import VembedError

CATEGORIES = ("bicycle", "chair", "coffee_maker")
HEADER = "image_id class_id super_class_id path"


def make_sop_tree(root: Path, train_classes: int = 4, test_classes: int = 2, per_class: int = 3) -> Path:
    """``root/Stanford_Online_Products/`` with Ebay_train.txt, Ebay_test.txt and <category>_final/ images."""
    sop = root / "Stanford_Online_Products"
    lines: dict[str, list[str]] = {"train": [HEADER], "test": [HEADER]}
    image_id = class_id = 0
    for split, n_classes in (("train", train_classes), ("test", test_classes)):
        for super_id, category in enumerate(CATEGORIES, start=1):
            for _ in range(n_classes):
                class_id += 1
                for j in range(per_class):
                    image_id += 1
                    rel = f"{category}_final/{class_id:06d}_{j}.JPG"
                    (sop / rel).parent.mkdir(parents=True, exist_ok=True)
                    class_image(class_id, j, size=12).save(sop / rel, "JPEG")
                    lines[split].append(f"{image_id} {class_id} {super_id} {rel}")
    for split in ("train", "test"):
        (sop / f"Ebay_{split}.txt").write_text("\n".join(lines[split]) + "\n")
    return sop


@pytest.fixture
def sop_tree(tmp_path) -> Path:
    return make_sop_tree(tmp_path / "download")


def labels(path: Path) -> Counter:
    return Counter(json.loads(line)["label"] for line in path.read_text().splitlines())


def test_kaggle_download_layout_gives_train_val_test(tmp_path, sop_tree, monkeypatch):
    calls = []

    def fake_download(handle, *args, **kwargs):
        calls.append(handle)
        return str(sop_tree.parent)  # the Kaggle copy nests the tree one folder deep

    monkeypatch.setattr(kagglehub, "dataset_download", fake_download)
    result = prepare_sop(out=tmp_path / "out", val_classes_ratio=0.25)
    assert calls == [KAGGLE_SLUG]
    assert set(result.files) == {"train", "val", "test"}
    train, val, test = (labels(result.files[n]) for n in ("train", "val", "test"))
    assert not set(train) & set(val)  # val holds out whole products
    assert set(train) | set(val) == set(range(1, 13))  # ... carved from the official train split only
    assert set(test) == set(range(13, 19))  # test = the official test split, untouched
    assert sum(test.values()) == 18
    rows = [json.loads(line) for line in result.files["val"].read_text().splitlines()]
    assert {row["category"] for row in rows} == set(CATEGORIES)  # one product per category held out
    assert rows[0]["image"].startswith(str(sop_tree))  # images live outside --out: absolute paths
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["images"] == 54 and summary["classes"] == 18 and summary["categories"] == 3
    assert summary["splits"]["test"]["images"] == 18
    assert summary["images_per_class"] == {"min": 3, "median": 3.0, "max": 3}


def test_records_read_back_with_labels_and_categories(tmp_path, sop_tree):
    result = prepare_sop(sop_tree.parent, tmp_path / "out", val_classes_ratio=0.25)
    records = read_records(result.files["train"], require_label=True).records
    assert len(records) == 27
    assert all(rec.image.is_file() and rec.category in CATEGORIES for rec in records)
    assert records[0].label == 1 and records[0].category == "bicycle"


def test_same_seed_byte_identical_other_seed_differs(tmp_path, sop_tree):
    a = prepare_sop(sop_tree, tmp_path / "a", seed=3, val_classes_ratio=0.25)
    b = prepare_sop(sop_tree, tmp_path / "b", seed=3, val_classes_ratio=0.25)
    c = prepare_sop(sop_tree, tmp_path / "c", seed=4, val_classes_ratio=0.25)
    for name in ("train", "val", "test"):
        assert a.files[name].read_bytes() == b.files[name].read_bytes()
    assert (tmp_path / "a/summary.json").read_bytes() == (tmp_path / "b/summary.json").read_bytes()
    assert a.files["val"].read_bytes() != c.files["val"].read_bytes()


def test_rerun_is_idempotent_and_drops_files_it_no_longer_writes(tmp_path, sop_tree):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    first = prepare_sop(sop_tree, out, val_classes_ratio=0.25)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    prepare_sop(sop_tree, out, val_classes_ratio=0.25)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    prepare_sop(sop_tree, out, val_classes_ratio=0)
    assert not first.files["val"].exists()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "summary.json", "test.jsonl", "train.jsonl"]
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temporary files left behind


def test_images_under_out_are_written_relative(sop_tree):
    result = prepare_sop(sop_tree, sop_tree, val_classes_ratio=0.25)
    first = json.loads(result.files["test"].read_text().splitlines()[0])
    assert first["image"] == "bicycle_final/000013_0.JPG"
    assert all(rec.image.is_file() for rec in read_records(result.files["test"]).records)


def test_missing_image_stops_with_its_path_and_writes_nothing(tmp_path, sop_tree):
    (sop_tree / "chair_final/000005_1.JPG").unlink()
    with pytest.raises(VembedError, match=r"Ebay_train.txt:\d+: image not found: .*000005_1.JPG"):
        prepare_sop(sop_tree, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_skip_bad_leaves_missing_and_undecodable_images_out_and_lists_them(tmp_path, sop_tree):
    (sop_tree / "chair_final/000005_1.JPG").unlink()
    (sop_tree / "bicycle_final/000013_2.JPG").write_bytes(b"\xff\xd8 not a jpeg")
    result = prepare_sop(sop_tree, tmp_path / "out", check=CheckOptions(True, workers=2, skip_bad=True))
    counts = result.summary["problems"]["counts"]
    assert counts == {"missing-image": 1, "bad-image": 1}
    assert result.summary["images"] == 52
    problems = (tmp_path / "out" / "problems.txt").read_text()
    assert "000005_1.JPG" in problems and "cannot decode image" in problems and "000013_2.JPG" in problems
    assert "000013_2.JPG" not in result.files["test"].read_text()


def test_malformed_line_is_reported_with_file_and_line(tmp_path, sop_tree):
    listing = sop_tree / "Ebay_test.txt"
    listing.write_text(listing.read_text() + "99 oops\n")
    with pytest.raises(VembedError, match=r"Ebay_test.txt:20: expected 'image_id class_id"):
        prepare_sop(sop_tree, tmp_path / "out")


def test_duplicate_path_is_reported_and_dropped(tmp_path, sop_tree):
    listing = sop_tree / "Ebay_test.txt"
    last = listing.read_text().splitlines()[-1].split()
    listing.write_text(listing.read_text() + f"999 {last[1]} {last[2]} {last[3]}\n")
    result = prepare_sop(sop_tree, tmp_path / "out")
    assert result.summary["problems"]["counts"] == {"duplicate": 1}
    assert sum(labels(result.files["test"]).values()) == 18


def test_root_without_lists_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VembedError, match="no folder with Ebay_train.txt and Ebay_test.txt"):
        prepare_sop(tmp_path / "empty", tmp_path / "out")


def test_kaggle_failure_is_a_clear_error(tmp_path, monkeypatch):
    def offline(handle, *args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    with pytest.raises(VembedError, match="could not download Kaggle data set .*--root"):
        prepare_sop(out=tmp_path / "out")


def test_cli_prints_summary_and_exits_2_on_mistakes(tmp_path, sop_tree):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["prepare", "sop", "--root", str(sop_tree), "--out", str(out), "--val-classes", "0.25"]
    )
    assert result.exit_code == 0, result.output
    assert "train.jsonl" in result.output and "54" in result.output
    assert (out / "summary.json").is_file()
    bad = runner.invoke(app, ["prepare", "sop", "--root", str(tmp_path / "nope"), "--out", str(out)])
    assert bad.exit_code == 2
    assert "SOP root not found" in bad.output


def test_eval_sop_reads_the_prepared_folder(tmp_path, sop_tree, tiny_model):
    out = tmp_path / "sop"
    prepare_sop(sop_tree, out, val_classes_ratio=0.25)
    result = CliRunner().invoke(
        app,
        ["eval", "sop", "--model", str(tiny_model), "--data", str(out), "--k", "1,5", "data.num_workers=0"],
    )
    assert result.exit_code == 0, result.output
    assert "recall@1" in result.output.lower() or "R@1" in result.output
