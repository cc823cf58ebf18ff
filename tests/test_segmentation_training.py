"""train.task=segmentation on the one training loop: it learns, resumes exactly, exports, and refuses
retrieval settings (tiny encoder, synthetic shapes at 56 px)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_model
from safetensors.torch import load_file
from training_data import max_abs_diff, one_thread
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.prepare import prepare_segfolder
from vembed.data.shapes import write_shapes
from vembed.errors import VembedError
from vembed.settings import load_settings
from vembed.training import train

OPTIONS = ("train.method=full", "train.batch_size=8", "train.lr=1e-3", "train.head_lr=1e-2", "train.epochs=3")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg-train")
    write_shapes(root / "shapes", count=40, size=56, seed=0)
    prepare_segfolder(root / "shapes", root / "data", val_ratio=0.2, test_ratio=0)
    return root, save_tiny_model(root / "tiny", image_size=56)


def seg_settings(root, model, out, *extra):
    return load_settings(
        None,
        [
            f"model.name={model}",
            "model.image_size=56",
            "train.task=segmentation",
            f"data.train={root / 'data' / 'train.jsonl'}",
            f"data.val={root / 'data' / 'val.jsonl'}",
            f"train.output_dir={out}",
            "data.num_workers=0",
            "eval.batch_size=16",
            *OPTIONS,
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory):
    root, model = shapes
    with one_thread():
        return train(seg_settings(root, model, tmp_path_factory.mktemp("ref") / "run"), show_progress=False)


def test_linear_decoder_learns_shapes_to_a_clearly_higher_miou(reference):
    before, best = reference.history[0], reference.best
    assert before["step"] == 0 and reference.steps == 12  # 32 images / 8 = 4 steps x 3 epochs
    assert best["miou"] > before["miou"] + 0.2, (before, best)
    saved = json.loads((reference.final_dir / "vembed.json").read_text())
    assert saved["task_head"]["kind"] == "segmenter" and saved["training"]["select_metric"] == "miou"
    assert saved["task_head"]["class_names"] == ["background", "square", "disc"]


def test_resume_of_a_segmentation_run_equals_the_uninterrupted_run(shapes, tmp_path, reference):
    root, model = shapes
    out = tmp_path / "run"

    def crash(info):
        if info.step == 6:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(seg_settings(root, model, out, "train.checkpoint_every=5"), show_progress=False, on_step=crash)
    result = train(
        seg_settings(root, model, out, "train.checkpoint_every=5", "train.resume=true"), show_progress=False
    )
    assert result.resumed_from is not None and result.steps == reference.steps
    assert [h["miou"] for h in result.history] == pytest.approx(
        [h["miou"] for h in reference.history], abs=1e-6
    )
    mine = load_file(str(result.final_dir / "vembed_head.safetensors"))
    theirs = load_file(str(reference.final_dir / "vembed_head.safetensors"))
    assert max_abs_diff(mine, theirs) <= 1e-6


def test_lora_fpn_run_exports_a_model_transformers_and_vembed_load(shapes, tmp_path):
    import transformers

    root, model = shapes
    out = tmp_path / "run"
    settings = seg_settings(root, model, out, "train.method=lora", "model.decoder=fpn", "train.max_steps=2")
    train(settings, show_progress=False)
    export = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(out), "--out", str(export)])
    assert result.exit_code == 0, result.output
    assert "## Segmentation" in (export / "README.md").read_text()
    encoder = transformers.AutoModel.from_pretrained(export)
    assert not any("lora" in name for name, _ in encoder.named_parameters())
    from vembed.models.segmenter import create_segmenter

    a, b = create_segmenter(out / "final"), create_segmenter(export)
    x = torch.randn(1, 3, 56, 56)
    assert b.decoder_name == "fpn" and torch.allclose(a.predict(x), b.predict(x), atol=1e-5)


def test_retrieval_settings_and_class_mismatch_are_one_line_errors(shapes, tmp_path):
    root, model = shapes
    with pytest.raises(VembedError, match="train.loss='infonce' is a retrieval loss"):
        train(seg_settings(root, model, tmp_path / "a", "train.loss=infonce"), show_progress=False)
    with pytest.raises(VembedError, match="train.temperature is a retrieval setting"):
        train(seg_settings(root, model, tmp_path / "b", "train.temperature=0.1"), show_progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "val.jsonl").write_text(
        (root / "data" / "val.jsonl").read_text().replace('"images/', f'"{root}/data/images/')
    )
    (other / "classes.txt").write_text("a\nb\nc\nd\n")
    settings = seg_settings(root, model, tmp_path / "c", f"data.val={other / 'val.jsonl'}")
    with pytest.raises(VembedError, match="4 classes, but the training data has 3"):
        train(settings, show_progress=False)
