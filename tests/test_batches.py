"""P x K batches fit any data set: too few classes raise K (said once), single-image classes are reported."""

from __future__ import annotations

import json

import pytest
from training_data import make_nuisance_dataset, one_thread, tiny_settings

from vembed.errors import VembedError
from vembed.training import data as data_module
from vembed.training import train
from vembed.training.data import build_batch_sampler, epoch_batches, fit_pk, read_labelled


@pytest.fixture
def eight_classes(tmp_path):
    """8 classes x 10 images, plus a class with a single image."""
    records = make_nuisance_dataset(tmp_path / "data", num_classes=8, per_class=10)
    image = tmp_path / "data" / "images" / "c0" / "0.png"
    with records.open("a") as fh:
        fh.write(json.dumps({"image": str(image), "label": "lonely"}) + "\n")
    return records


@pytest.mark.parametrize(
    "batch,k,classes,expected",
    [
        (64, 2, 100, (32, 2)),  # enough classes: unchanged
        (64, 2, 8, (8, 8)),  # 8 classes at batch 64
        (64, 4, 10, (8, 8)),  # 10 classes: the smallest K dividing 64 with P <= 10
        (128, 2, 8, (8, 16)),
        (80, 8, 10, (10, 8)),
        (15, 3, 2, (2, 7)),  # no divisor leaves P >= 2: every class, 14 images
    ],
)
def test_fit_pk(batch, k, classes, expected):
    notes = []
    assert fit_pk(batch, k, classes, say=notes.append) == expected
    assert len(notes) == (0 if expected == (batch // k, k) else 1)


def test_fit_pk_needs_two_classes():
    with pytest.raises(VembedError, match="at least 2 classes"):
        fit_pk(64, 2, 1)


def test_an_eight_class_set_fills_batches_of_64_and_reports_single_images(
    tiny_model, eight_classes, tmp_path, monkeypatch
):
    notes = []
    monkeypatch.setattr(data_module, "log", notes.append)
    settings = tiny_settings(tiny_model, eight_classes, tmp_path / "run", "train.batch_size=64")
    labelled = read_labelled(settings.data.train, settings, what="training")
    batches = epoch_batches(build_batch_sampler(labelled, settings.train), 0)
    assert batches
    for batch in batches:
        labels = [labelled.labels[i] for i in batch]
        assert len(batch) == 64 and sorted(labels.count(c) for c in set(labels)) == [8] * 8
    assert len(notes) == 2
    assert "1 of 9 classes have a single image" in notes[0] and "'lonely'" in notes[0]
    assert "8 classes x 8 images" in notes[1]


@pytest.mark.parametrize("loss", ["infonce", "supcon"])
def test_contrastive_training_at_batch_64_on_eight_classes(tiny_model, eight_classes, tmp_path, loss):
    settings = tiny_settings(
        tiny_model,
        eight_classes,
        tmp_path / "run",
        "train.batch_size=64",
        f"train.loss={loss}",
        "train.max_steps=1",
    )
    with one_thread():
        result = train(settings, show_progress=False)
    assert result.steps == 1 and (result.final_dir / "config.json").is_file()
