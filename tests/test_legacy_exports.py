"""Model folders written by ``vembed export`` before the task contract (vembed at bac7275) load and
give the same outputs: an embedding model, a classifier and a segmenter (tests/data/exports_0_1,
made by that version from a tiny random DINOv2; ``expected.safetensors`` holds what it computed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vembed.export import export_model
from vembed.models.factory import load_embedder
from vembed.models.heads import ClassifierHead, load_head, require_classifier
from vembed.models.loader import load_model
from vembed.models.segmenter import SegmenterHead, create_segmenter

DATA = Path(__file__).parent / "data" / "exports_0_1"
EXPECTED = load_file(str(DATA / "expected.safetensors"))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@pytest.mark.parametrize("name", ["embedding", "classifier", "segmenter"])
def test_an_old_export_embeds_the_same(name, tmp_path):
    embedder = load_embedder(DATA / name, device="cpu", dtype="float32")
    got = embedder.encode(EXPECTED["batch"])
    assert cosine(got, EXPECTED[f"{name}.embeddings"]).min() >= 0.9999
    # and exporting it again with today's writer keeps it so (what the loader reads is what it writes)
    export_model(DATA / name, tmp_path / "again")
    again = load_embedder(tmp_path / "again", device="cpu", dtype="float32").encode(EXPECTED["batch"])
    assert cosine(again, EXPECTED[f"{name}.embeddings"]).min() >= 0.9999
    before, after = load_model(DATA / name, weights=False), load_model(tmp_path / "again", weights=False)
    assert after.task_head == before.task_head and set(after.task_head_state) == set(before.task_head_state)


def test_an_old_classifier_gives_the_same_probabilities():
    head = require_classifier(DATA / "classifier")
    assert isinstance(load_head(load_model(DATA / "classifier", weights=False)), ClassifierHead)
    assert head.labels == ["cat", "dog", "café crème"]
    probs = head.probabilities(EXPECTED["classifier.embeddings"])
    assert torch.allclose(probs, EXPECTED["classifier.probabilities"], atol=1e-6)


def test_an_old_segmenter_gives_the_same_logits():
    assert isinstance(load_head(load_model(DATA / "segmenter", weights=False)), SegmenterHead)
    segmenter = create_segmenter(DATA / "segmenter", device="cpu", dtype="float32")
    assert segmenter.class_names == ["bg", "a", "b"]
    assert torch.allclose(segmenter.predict(EXPECTED["batch"]), EXPECTED["segmenter.logits"], atol=1e-5)
