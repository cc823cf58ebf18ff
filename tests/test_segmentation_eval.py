"""eval segmentation, predict-masks and the saved segmentation model (tiny untrained models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from PIL import Image
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.prepare import prepare_segfolder
from vembed.data.shapes import write_shapes
from vembed.errors import VembedError
from vembed.models.factory import save_model
from vembed.models.segmenter import create_segmenter
from vembed.settings import ModelSettings


@pytest.fixture(scope="module")
def seg_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    tiny = save_tiny_model(root / "tiny")
    write_shapes(root / "shapes", count=8, size=40)
    prepare_segfolder(root / "shapes", root / "data", val_ratio=0.25, test_ratio=0)
    model = create_segmenter(tiny, ModelSettings(image_size=28, decoder="fpn"), num_classes=3,
                             class_names=["background", "square", "disc"])  # fmt: skip
    save_model(model, root / "model", head=model.head())
    return root, model


def test_saved_segmenter_round_trips_and_its_encoder_loads_with_transformers(seg_setup):
    import transformers

    root, model = seg_setup
    again = create_segmenter(root / "model")
    assert again.decoder_name == "fpn" and again.class_names == ["background", "square", "disc"]
    assert again.spec.image_size == 28
    x = torch.randn(2, 3, 28, 28)
    assert torch.allclose(model.predict(x), again.predict(x), atol=1e-6)
    encoder = transformers.AutoModel.from_pretrained(root / "model")
    assert type(encoder).__name__ == "Dinov2Model"
    with pytest.raises(VembedError, match="the model has 3 classes but the data has 5"):
        create_segmenter(root / "model", num_classes=5)
    with pytest.raises(VembedError, match="not a segmentation model"):
        create_segmenter(root / "tiny")


def test_eval_segmentation_cli_json_keys_corruptions_and_plot(seg_setup):
    root, _ = seg_setup
    out = root / "eval.json"
    base = [
        "eval",
        "segmentation",
        "--model",
        str(root / "model"),
        "--data",
        str(root / "data" / "val.jsonl"),
    ]
    args = [*base, "--corruptions", "fog,pixelate", "--severity", "1,5", "--json", str(out)]
    result = CliRunner().invoke(app, [*args, "--plot", str(root / "p.png"), "data.num_workers=0"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert 0 <= report["miou"] <= 1 and 0 <= report["pixel_accuracy"] <= 1
    assert set(report["per_class_iou"]) == {"background", "square", "disc"}
    assert set(report["corruptions"]) == {"fog", "pixelate"} and set(report["corruptions"]["fog"]) == {
        "1",
        "5",
    }
    assert (root / "p.png").stat().st_size > 0
    full = CliRunner().invoke(
        app, [*base, "--full-res", "--compare", str(root / "model"), "--json", str(out)]
    )
    assert full.exit_code == 0, full.output
    report = json.loads(out.read_text())
    assert report["full_res"] is True and report["compare"][0]["delta"]["miou"] == 0
    bad = CliRunner().invoke(app, [*base, "--corruptions", "rain"])
    assert bad.exit_code == 2 and "unknown corruption 'rain'" in bad.output
    notseg = CliRunner().invoke(
        app, ["eval", "segmentation", "--model", str(root / "tiny"), "--data", base[5]]
    )
    assert notseg.exit_code == 2 and "not a segmentation model" in notseg.output


def test_predict_masks_writes_one_channel_masks_at_the_original_size(seg_setup, tmp_path):
    root, _ = seg_setup
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (61, 37), (200, 60, 50)).save(images / "wide.jpg")
    Image.new("RGB", (20, 45), (50, 90, 210)).save(images / "tall.png")
    out = tmp_path / "masks"
    result = CliRunner().invoke(
        app, ["predict-masks", str(root / "model"), str(images), "--out", str(out), "--overlay"]
    )
    assert result.exit_code == 0, result.output
    for name, size in (("wide", (61, 37)), ("tall", (20, 45))):
        mask = Image.open(out / f"{name}.png")
        assert mask.mode == "L" and mask.size == size
        assert np.asarray(mask).max() < 3
        assert Image.open(out / f"{name}.overlay.png").size == size
    one = CliRunner().invoke(app, ["predict-masks", str(root / "model"), "-", "--out", str(tmp_path / "m2"), "--full-res"],
                             input=f"{images / 'wide.jpg'}\n")  # fmt: skip
    assert one.exit_code == 0, one.output
    assert Image.open(tmp_path / "m2" / "wide.png").size == (61, 37)
    assert sorted(p.name for p in Path(tmp_path / "m2").iterdir()) == ["wide.png"]


def test_segmentation_evaluator_called_directly_gives_the_cli_numbers(seg_setup, tmp_path):
    from vembed.data.records import read_records
    from vembed.evaluation.base import Evaluator
    from vembed.tasks.segmentation.evaluator import SegEvalOptions, SegmentationEvaluator

    root, _ = seg_setup
    data = root / "data" / "val.jsonl"
    out = tmp_path / "seg.json"
    args = ["eval", "segmentation", "--model", str(root / "model"), "--data", str(data)]
    args += ["--corruptions", "fog", "--severity", "2", "--json", str(out), "data.num_workers=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cli = json.loads(out.read_text())
    options = SegEvalOptions(num_workers=0, corruptions=("fog",), severities=(2,))
    evaluator = SegmentationEvaluator(read_records(data).masks(), options)
    assert isinstance(evaluator, Evaluator)
    direct = evaluator(create_segmenter(root / "model"), show_progress=False)
    assert direct.primary_metric == "miou" and set(direct.metrics) == set(evaluator.metrics)
    assert direct.metrics == {"miou": cli["miou"], "pixel_accuracy": cli["pixel_accuracy"]}
    assert direct.details["corruptions"] == cli["corruptions"]
    assert direct.details["metrics"].per_class_iou == cli["per_class_iou"]


def test_segmentation_progress_bar_shows_a_rate_not_zero(seg_setup, monkeypatch):
    import io
    import re

    from rich.console import Console

    from vembed import console as vconsole
    from vembed.data.records import read_records
    from vembed.tasks.segmentation.evaluator import evaluate_segmentation

    root, model = seg_setup
    out = io.StringIO()
    monkeypatch.setattr(vconsole, "console", Console(file=out, force_terminal=True, width=160))
    records = read_records(root / "data" / "train.jsonl").masks()
    evaluate_segmentation(model, records, batch_size=2)
    rates = [float(r) for r in re.findall(r"([0-9.]+) img/s", out.getvalue())]
    assert rates and rates[-1] > 0
