"""`vembed prepare flickr30k / coco-captions / jsonl --text-key`: Karpathy splits, local roots and a
fake kagglehub (no network)."""

from __future__ import annotations

import json
import sys
import types

import pytest
from PIL import Image
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.captions import read_captions
from vembed.data.prepare.captions import prepare_coco_captions, prepare_flickr30k
from vembed.errors import VembedError

runner = CliRunner()


def _karpathy(root, name, layout):
    """Images and a Karpathy split file: ``layout`` = [(filepath, filename, split), ...]."""
    images = []
    for i, (filepath, filename, split) in enumerate(layout):
        folder = root / "images" / filepath
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 20 % 255, 0, 0)).save(folder / filename)
        entry = {
            "filename": filename,
            "split": split,
            "sentences": [{"raw": f"caption {i} a"}, {"raw": f" caption {i} b "}],
        }
        if filepath:
            entry["filepath"] = filepath
        images.append(entry)
    (root / f"dataset_{name}.json").write_text(json.dumps({"images": images, "dataset": name}))
    return root


def test_flickr30k_from_a_local_root(tmp_path):
    root = _karpathy(tmp_path / "f30k", "flickr30k", [("", f"{i}.jpg", s) for i, s in
                     enumerate(["train", "train", "train", "val", "test"])])  # fmt: skip
    result = prepare_flickr30k(root, tmp_path / "out")
    assert result.counts == {"train": {"images": 3, "captions": 6}, "val": {"images": 1, "captions": 2},
                             "test": {"images": 1, "captions": 2}}  # fmt: skip
    test = read_captions(tmp_path / "out" / "test.jsonl")
    assert test.records[0].captions == ("caption 4 a", "caption 4 b")
    assert test.records[0].image == root / "images" / "4.jpg"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["task"] == "image_text" and summary["splits"]["train"]["images"] == 3


def test_flickr30k_through_kagglehub(tmp_path, monkeypatch):
    root = _karpathy(tmp_path / "kaggle", "flickr30k", [("", "a.jpg", "train"), ("", "b.jpg", "test")])
    asked = []
    fake = types.SimpleNamespace(dataset_download=lambda slug: asked.append(slug) or str(root))
    monkeypatch.setitem(sys.modules, "kagglehub", fake)
    result = runner.invoke(app, ["prepare", "flickr30k", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert asked == ["hsankesara/flickr-image-dataset"]
    assert (tmp_path / "out" / "train.jsonl").is_file() and (tmp_path / "out" / "test.jsonl").is_file()


def test_coco_captions_karpathy_5k_test_with_restval_in_train(tmp_path):
    layout = [("train2014", "t1.jpg", "train"), ("val2014", "r1.jpg", "restval"), ("val2014", "v1.jpg", "val"),
              ("val2014", "x1.jpg", "test")]  # fmt: skip
    root = _karpathy(tmp_path / "coco", "coco", layout)
    result = prepare_coco_captions(root, tmp_path / "out")
    assert {k: v["images"] for k, v in result.counts.items()} == {"train": 2, "val": 1, "test": 1}
    assert read_captions(tmp_path / "out" / "test.jsonl").records[0].image.name == "x1.jpg"


def test_missing_images_and_bad_split_files_are_errors(tmp_path):
    root = _karpathy(tmp_path / "f", "flickr30k", [("", "a.jpg", "train"), ("", "b.jpg", "test")])
    (root / "images" / "b.jpg").unlink()
    with pytest.raises(VembedError, match="images\\[1\\]: image not found"):
        prepare_flickr30k(root, tmp_path / "out")
    assert prepare_flickr30k(root, tmp_path / "out", skip_bad=True).counts == {
        "train": {"images": 1, "captions": 2}
    }
    (root / "dataset_flickr30k.json").write_text(
        json.dumps({"images": [{"filename": "a.jpg", "split": "dev"}]})
    )
    with pytest.raises(VembedError, match="split 'dev' is not one of"):
        prepare_flickr30k(root, tmp_path / "out")


def test_jsonl_and_csv_with_a_text_key(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(10):
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / f"{i}.png")
        rows += [
            {"path": f"imgs/{i}.png", "caption": f"picture {i}"},
            {"path": f"imgs/{i}.png", "caption": f"photo {i}"},
        ]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = runner.invoke(app, ["prepare", "jsonl", str(tmp_path / "mine.jsonl"), "--out", str(tmp_path / "o"),
                                 "--image-key", "path", "--text-key", "caption", "--val-ratio", "0.2",
                                 "--test-ratio", "0.2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    splits = {n: read_captions(tmp_path / "o" / f"{n}.jsonl") for n in ("train", "val", "test")}
    assert [len(s) for s in splits.values()] == [6, 2, 2]
    assert all(len(r.captions) == 2 for s in splits.values() for r in s.records)
    (tmp_path / "mine.csv").write_text("path,caption\nimgs/0.png,a cat\nimgs/1.png,\n")
    bad = runner.invoke(app, ["prepare", "csv", str(tmp_path / "mine.csv"), "--out", str(tmp_path / "c"),
                              "--image-key", "path", "--text-key", "caption"])  # fmt: skip
    assert bad.exit_code != 0 and "mine.csv:3" in bad.output and "caption field 'caption'" in bad.output
