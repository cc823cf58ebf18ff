"""`vembed train` with train.task=image_text on captioned digits: a tiny random-init CLIP learns to
match held-out captions to their images, with the clip and with the siglip loss; a vembed-factory t2i
config trains too."""

from __future__ import annotations

import json

import pytest
from dual_helpers import captioned_digits, save_tiny_dual
from typer.testing import CliRunner

from vembed.cli import app
from vembed.models.dual import DualEncoder, load_dual_encoder

runner = CliRunner()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("it-train")
    train, held = captioned_digits(root / "data")
    return {"base": save_tiny_dual(root / "clip", "clip"), "train": train, "held": held, "root": root}


def _train(digits, name: str, *overrides: str):
    out = digits["root"] / name
    args = ["train", "--model", str(digits["base"]), f"data.train={digits['train']}",
            f"data.val={digits['held']}", "train.task=image_text", "train.method=full", "train.lr=1e-3",
            "data.num_workers=0", f"train.output_dir={out}", *overrides]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, [r for r in rows if r.get("kind") == "val"]


@pytest.mark.parametrize(
    ("loss", "overrides", "gain"),
    [("clip", ("train.batch_size=64", "train.epochs=8"), 0.15), ("siglip", ("train.batch_size=32", "train.epochs=8"), 0.05)],
)  # fmt: skip
def test_fine_tuning_raises_held_out_text_to_image_recall(digits, loss, overrides, gain):
    out, val = _train(digits, f"run-{loss}", f"train.loss={loss}", *overrides)
    before, best = val[0], max(val, key=lambda r: r["mean_recall@1"])
    assert before["step"] == 0 and {"t2i_recall@1", "i2t_recall@10", "rsum", "mean_recall@1"} <= set(before)
    assert best["t2i_recall@1"] >= before["t2i_recall@1"] + gain  # 30 held-out images: chance is 1/30
    assert best["rsum"] >= before["rsum"] + 100
    final = out / "final"
    saved = json.loads((final / "vembed.json").read_text())
    assert saved["training"]["task"] == "image_text" and saved["training"]["loss"] == loss
    assert saved["training"]["select_metric"] == "mean_recall@1"
    assert isinstance(load_dual_encoder(str(final), device="cpu"), DualEncoder)
    assert (out / "metrics.png").stat().st_size > 1000


def test_a_vembed_factory_t2i_config_trains(digits, tmp_path):
    config = tmp_path / "factory.yaml"
    config.write_text(
        f"model_name_or_path: {digits['base']}\nretrieval_mode: t2i\nuse_lora: true\n"
        f"use_gradient_cache: true\ngradient_cache_chunk_size: 16\n"
        f"data_path: {digits['train']}\nval_data_path: {digits['held']}\noutput_dir: {tmp_path / 'run'}\n"
        "epochs: 1\nbatch_size: 32\nlearning_rate: 1.0e-3\nnum_workers: 0\n"
    )
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "retrieval_mode t2i" in result.output
    saved = json.loads((tmp_path / "run" / "final" / "vembed.json").read_text())
    assert saved["training"]["task"] == "image_text" and saved["training"]["method"] == "lora"


def test_image_text_settings_mistakes_are_one_error_before_loading(digits, tmp_path):
    base = ["train", "--model", str(digits["base"]), f"data.train={digits['train']}", "train.task=image_text",
            f"train.output_dir={tmp_path / 'x'}"]  # fmt: skip
    for override, message in [
        ("train.loss=arcface", "trains with clip or siglip"),
        ("train.select_metric=map@r", "train.select_metric='map@r' is not a metric"),
        ("train.towers=audio", "train.towers"),
        ("train.margin=0.3", "does not apply to train.task=image_text"),
    ]:
        result = runner.invoke(app, [*base, override])
        assert result.exit_code != 0 and message in result.output, (override, result.output)
