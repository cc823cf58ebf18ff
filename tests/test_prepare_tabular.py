"""`vembed prepare jsonl` / `csv`: the user's own records, validated per line, mapped, normalised, split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import class_image, make_image_dataset
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.prepare import prepare_csv, prepare_jsonl
from vembed.data.prepare.validate import CheckOptions
from vembed.data.records import read_records
from vembed.errors import VembedError


@pytest.fixture
def images(tmp_path) -> Path:
    """``data/images/class_k/img_i.png`` for 4 classes × 10 images (and data/records.jsonl)."""
    make_image_dataset(tmp_path / "data", num_classes=4, per_class=10, size=12)
    return tmp_path / "data"


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_with_mapped_fields_is_normalised_and_split(images, tmp_path):
    src = write_lines(
        images / "mine.jsonl",
        [
            {"path": f"images/class_{c}/img_{i}.png", "class": f"k{c}", "group": "g"}
            for c in range(4)
            for i in range(10)
        ],
    )
    result = prepare_jsonl(
        src,
        tmp_path / "out",
        image_key="path",
        label_key="class",
        category_key="group",
        val_ratio=0.2,
        test_ratio=0.2,
    )
    train = rows(result.files["train"])
    assert set(train[0]) == {"image", "label", "category"}  # vembed's field names
    assert Counter(r["label"] for r in rows(result.files["val"])) == {f"k{c}": 2 for c in range(4)}
    assert all(rec.image.is_file() for rec in read_records(result.files["test"], require_label=True).records)
    assert Path(train[0]["image"]).is_absolute()  # images outside --out


def test_jsonl_problems_are_reported_per_line(images, tmp_path):
    src = write_lines(
        images / "bad.jsonl",
        [
            {"image": "images/class_0/img_0.png", "label": 0},
            "{not json",
            {"image": "images/class_0/img_1.png"},
            {"image": "images/class_0/img_2.png", "label": 1.5},
            {"image": "images/class_0/nope.png", "label": 0},
            {"image": "images/class_0/img_0.png", "label": 3},
            {"image": "images/class_1/img_0.png", "label": 1, "split": "holdout"},
            {"query_image": "images/class_0/img_0.png", "positive": "images/class_0/img_1.png"},
        ],
    )
    with pytest.raises(VembedError) as err:
        prepare_jsonl(src, tmp_path / "out")
    message = str(err.value)
    for expected in (
        "bad.jsonl:2: malformed JSON",
        "bad.jsonl:3: missing field 'label'",
        "bad.jsonl:4: 'label' must be an integer or a string, got 1.5",
        "bad.jsonl:5: image not found",
        "bad.jsonl:6: ",  # same image as line 1 with another label
        "bad.jsonl:7: 'split' must be train, val or test",
        "bad.jsonl:8: a pair record",
    ):
        assert expected in message
    assert "conflicting-duplicate" in message
    assert not (tmp_path / "out").exists()


def test_skip_bad_writes_the_good_records_and_lists_the_rest(images, tmp_path):
    good = [{"image": f"images/class_{c}/img_{i}.png", "label": c} for c in range(4) for i in range(10)]
    src = write_lines(
        images / "some_bad.jsonl", [*good, {"image": "images/missing.png", "label": 0}, "[1, 2]"]
    )
    result = prepare_jsonl(src, tmp_path / "out", check=CheckOptions(skip_bad=True))
    assert result.summary["images"] == 40
    assert result.summary["problems"]["counts"] == {"bad-record": 1, "missing-image": 1}
    listed = (tmp_path / "out" / "problems.txt").read_text().splitlines()
    assert listed[0].startswith("bad-record\t") and "some_bad.jsonl:42: expected a JSON object" in listed[0]
    assert "some_bad.jsonl:41: image not found" in listed[1]


def test_exact_duplicate_is_dropped_and_reported(images, tmp_path):
    good = [{"image": f"images/class_{c}/img_{i}.png", "label": c} for c in range(4) for i in range(10)]
    src = write_lines(images / "dups.jsonl", [*good, good[5]])
    result = prepare_jsonl(src, tmp_path / "out")
    assert result.summary["images"] == 40
    assert result.summary["problems"]["counts"] == {"duplicate": 1}
    assert "dups.jsonl:41" in result.summary["problems"]["first"][0]


def test_csv_with_split_column_and_sniffed_delimiter(images, tmp_path):
    lines = ["file;species;split"]
    for c in range(4):
        for i in range(10):
            split = "train" if i < 6 else "valid" if i < 8 else "test"
            lines.append(f"images/class_{c}/img_{i}.png;s{c};{split}")
    src = images / "table.csv"
    src.write_text("\n".join(lines) + "\n")
    result = prepare_csv(src, tmp_path / "out", image_key="file", label_key="species")
    assert {name: len(rows(path)) for name, path in result.files.items()} == {
        "train": 24,
        "val": 8,
        "test": 8,
    }
    assert all(r["image"].endswith(("img_6.png", "img_7.png")) for r in rows(result.files["val"]))
    assert result.summary["options"]["split"] == "column"


def test_csv_short_row_and_missing_column_name_the_line(images, tmp_path):
    src = images / "broken.csv"
    src.write_text("image,label\nimages/class_0/img_0.png,0\nimages/class_0/img_1.png\n")
    with pytest.raises(VembedError, match="broken.csv:3: fewer fields than the header"):
        prepare_csv(src, tmp_path / "out")
    src.write_text("path,label\nimages/class_0/img_0.png,0\n")  # a column every row lacks: said once
    with pytest.raises(
        VembedError,
        match=r"broken.csv: no 'image' column; the header has 'path', 'label'; name the column with --image-key",
    ):
        prepare_csv(src, tmp_path / "out")


def test_images_under_out_stay_relative_and_the_input_is_never_overwritten(images):
    src = write_lines(
        images / "train.jsonl",
        [{"image": f"images/class_{c}/img_{i}.png", "label": c} for c in range(4) for i in range(10)],
    )
    with pytest.raises(VembedError, match="would be overwritten by the train split"):
        prepare_jsonl(src, images)
    src = src.rename(images / "all.jsonl")
    result = prepare_jsonl(src, images)
    assert rows(result.files["train"])[0]["image"].startswith("images/class_")


def test_holdout_and_shots_for_own_records(images, tmp_path):
    extra = images / "images" / "class_4"
    extra.mkdir()
    for i in range(10):
        class_image(4, i, size=12).save(extra / f"img_{i}.png")
    src = write_lines(
        images / "five.jsonl",
        [{"image": f"images/class_{c}/img_{i}.png", "label": c} for c in range(5) for i in range(10)],
    )
    result = prepare_jsonl(src, tmp_path / "out", holdout_ratio=0.2, shots=2, test_ratio=0.3)
    unseen = {r["label"] for r in rows(result.files["unseen"])}
    assert len(unseen) == 1
    assert {r["label"] for r in rows(result.files["unseen_support"])} == unseen
    assert not unseen & {r["label"] for r in rows(result.files["train"])}


def test_cli_jsonl_and_csv(images, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["prepare", "jsonl", str(images / "records.jsonl"), "--out", str(out), "--seed", "5"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["seed"] == 5
    src = images / "t.csv"
    src.write_text("image,label\nimages/class_0/img_0.png,0\nimages/class_0/img_99.png,0\n")
    result = runner.invoke(app, ["prepare", "csv", str(src), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2
    assert "t.csv:3: image not found" in result.output


def test_split_column_must_be_on_every_row(images, tmp_path):
    src = write_lines(
        images / "mixed.jsonl",
        [
            {"image": "images/class_0/img_0.png", "label": 0, "split": "train"},
            {"image": "images/class_0/img_1.png", "label": 0},
        ],
    )
    with pytest.raises(VembedError, match="mixed.jsonl:2: no 'split' value, but other lines have one"):
        prepare_jsonl(src, tmp_path / "out")
