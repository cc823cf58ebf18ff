"""The transformers ``vit`` family (DINO v1, DeiT, the original ViT): registry, loading, training, export."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import save_tiny_model
from training_data import make_nuisance_dataset, one_thread, tiny_settings

from vembed.data.records import ImageRecord
from vembed.export import export_model
from vembed.inference import embed_records
from vembed.models.factory import create_embedder
from vembed.models.registry import HALF, IMAGENET_MEAN, REGISTRY, preprocessing_from_processor
from vembed.settings import ModelSettings


def test_registry_knows_dino_deit_and_vit_with_their_preprocessing():
    dino = REGISTRY["dino-vits16"]
    assert (dino.source, dino.family, dino.patch_size, dino.embed_dim) == (
        "facebook/dino-vits16",
        "vit",
        16,
        384,
    )
    assert (dino.mean, dino.resize, dino.resize_size, dino.interpolation) == (
        IMAGENET_MEAN,
        "shorter",
        256,
        "bicubic",
    )
    assert dino.pooling == "cls" and "q_proj" in dino.lora_targets and "query" in dino.lora_targets
    assert (
        REGISTRY["dino-vitb16"].embed_dim == 768
        and REGISTRY["deit-small"].source == "facebook/deit-small-patch16-224"
    )
    google = REGISTRY["vit-base"]
    assert google.source == "google/vit-base-patch16-224"
    assert (google.mean, google.std, google.resize, google.interpolation) == (
        HALF,
        HALF,
        "square",
        "bilinear",
    )


def test_one_number_sizes_of_older_processors():
    # ViTFeatureExtractor / DeiT: "size": 256 with a 224 centre crop; google/vit: "size": 224, no crop
    dino = preprocessing_from_processor({"size": 256, "crop_size": 224, "do_center_crop": True})
    assert dino == {"resize": "shorter", "image_size": 224, "crop_pct": 224 / 256}
    assert preprocessing_from_processor({"size": 224}) == {
        "resize": "square",
        "image_size": 224,
        "crop_pct": 1.0,
    }


@pytest.mark.parametrize("shape", ["vit", "vit_google"])
def test_tiny_vit_loads_with_its_preprocessing_and_embeds_at_any_size(tmp_path, shape):
    path = save_tiny_model(tmp_path / shape, shape)
    embedder = create_embedder(str(path), ModelSettings(dtype="float32"))
    spec = embedder.spec
    assert spec.family == "vit" and embedder.pooling == "cls" and embedder.num_prefix_tokens == 1
    if shape == "vit":
        assert (spec.mean, spec.resize, spec.resize_size, spec.interpolation) == (
            IMAGENET_MEAN,
            "shorter",
            32,
            "bicubic",
        )
    else:
        assert (spec.mean, spec.resize, spec.interpolation) == (HALF, "square", "bilinear")
    x = torch.randn(3, 3, 28, 28)
    out = embedder.encode(x)
    assert out.shape == (3, 32) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    # the CLS token of plain transformers' ViTModel (final layer norm applied)
    plain = transformers.ViTModel.from_pretrained(path, add_pooling_layer=False).eval()
    with torch.no_grad():
        cls = plain(pixel_values=x).last_hidden_state[:, 0]
    assert torch.allclose(out, torch.nn.functional.normalize(cls, dim=-1), atol=1e-5)
    # another input size interpolates the position embeddings (ViT refuses it otherwise)
    bigger = create_embedder(str(path), ModelSettings(image_size=42))
    assert bigger.encode(torch.randn(2, 3, 42, 42)).shape == (2, 32)


@pytest.mark.parametrize("shape", ["vit", "vit_google"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_tiny_vit_trains_exports_and_embeds(tmp_path, shape, method):
    from vembed.training import train

    base = save_tiny_model(tmp_path / "base", shape)
    train_file = make_nuisance_dataset(tmp_path / "train", num_classes=4, per_class=4, seed=0)
    settings = tiny_settings(
        base, train_file, tmp_path / "run", f"train.method={method}", "train.max_steps=2"
    )
    with one_thread():
        result = train(settings, show_progress=False)
    before = create_embedder(str(base))
    trained = create_embedder(str(result.final_dir))
    x = torch.randn(2, 3, 28, 28)
    assert not torch.allclose(before.encode(x), trained.encode(x), atol=1e-6)  # training changed it
    if method == "lora":
        saved = json.loads((result.final_dir / "vembed.json").read_text())
        assert {"q_proj", "k_proj", "v_proj"} <= set(saved["lora_targets"])
    out = export_model(result.final_dir, tmp_path / "export")
    assert out.max_abs_diff <= 1e-5
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "vit"
    images = [str(p) for p in sorted((tmp_path / "train").rglob("*.png"))[:3]]
    found = embed_records(
        create_embedder(str(tmp_path / "export")),
        [ImageRecord(p) for p in images],
        num_workers=0,
        show_progress=False,
    )
    expected = embed_records(trained, [ImageRecord(p) for p in images], num_workers=0, show_progress=False)
    assert torch.allclose(found.embeddings, expected.embeddings, atol=1e-5)
