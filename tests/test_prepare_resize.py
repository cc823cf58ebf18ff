"""`vembed prepare ... --resize-to N`: shorter-side-N copies, originals kept in the records."""

from __future__ import annotations

import json
import os

from conftest import class_image
from PIL import Image
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.datasets import ImageDataset
from vembed.data.records import read_records


def test_resize_to_writes_copies_and_keeps_the_originals(tmp_path):
    root = tmp_path / "photos"
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(3):
            class_image(c, i, size=40).resize((120, 90)).save(root / f"class{c}" / f"{i}.jpg", quality=90)
    class_image(0, 9, size=40).save(root / "class0" / "small.png")  # shorter side 40 <= 64: no copy
    out = tmp_path / "out"
    args = ["prepare", "imagefolder", str(root), "--out", str(out), "--val-ratio", "0", "--test-ratio", "0"]
    result = CliRunner().invoke(app, [*args, "--resize-to", "64"])
    assert result.exit_code == 0, result.output

    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 7
    for row in rows:
        original = root / row["image"] if not os.path.isabs(row["image"]) else row["image"]
        assert os.path.samefile(original, os.path.abspath(original))  # image still names the original
        if row["image"].endswith("small.png"):
            assert "resized" not in row
        else:
            copy = out / row["resized"]
            assert copy.parent.name == "resized-64"
            with Image.open(copy) as img:
                assert img.size == (85, 64)  # 120 x 90 → shorter side 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resized"] == {"size": 64, "folder": "resized-64", "copies": 6}

    records = read_records(out / "train.jsonl").records
    resized = [r for r in records if r.resized is not None]
    assert len(resized) == 6 and all(r.decode_path == r.resized for r in resized)
    dataset = ImageDataset(records, lambda img: img.size)
    assert sorted({dataset[i][0] for i in range(len(records))}) == [(40, 40), (85, 64)]

    # a rerun reuses the copies; a missing copy falls back to the original
    before = {p: p.stat().st_mtime_ns for p in (out / "resized-64").iterdir()}
    assert CliRunner().invoke(app, [*args, "--resize-to", "64"]).exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "resized-64").iterdir()} == before
    resized[0].resized.unlink()
    assert resized[0].decode_path == resized[0].image
