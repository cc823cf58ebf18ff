"""Shared fixtures: tiny backbones saved with save_pretrained, and images the tests generate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def save_tiny_model(path: Path, family: str = "dinov2", seed: int = 0, image_size: int = 28) -> Path:
    """A 2-layer backbone from a config, saved like a hub checkpoint (no download)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if family == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(image_size=image_size, patch_size=14, mlp_ratio=2, **common))
    elif family == "dinov2_with_registers":
        model = tf.Dinov2WithRegistersModel(
            tf.Dinov2WithRegistersConfig(
                image_size=image_size, patch_size=14, num_register_tokens=4, **common
            )
        )
    elif family == "clip":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=image_size, patch_size=14, **common))
    elif family == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(image_size=image_size, patch_size=14, **common))
    elif family == "dinov3":
        model = tf.DINOv3ViTModel(tf.DINOv3ViTConfig(image_size=image_size, patch_size=14, **common))
    elif family in ("vit", "vit_google"):
        # "vit": shaped like facebook/dino-vits16 (ViTModel, no pooler, DINO's resize 256 / crop 224
        # preprocessing, ImageNet mean/std); "vit_google": like google/vit-base-patch16-224 (a pooler,
        # square bilinear resize, mean/std 0.5).
        config = tf.ViTConfig(image_size=image_size, patch_size=14, **common)
        model = tf.ViTModel(config, add_pooling_layer=family == "vit_google")
        if family == "vit":
            processor = {"do_center_crop": True, "crop_size": image_size, "size": round(image_size / 0.875)}
            processor.update(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3)
        else:
            processor = {"size": {"height": image_size, "width": image_size}, "resample": 2}
            processor.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        path.mkdir(parents=True, exist_ok=True)
        processor["image_processor_type"] = "ViTImageProcessor"
        (path / "preprocessor_config.json").write_text(json.dumps(processor))
    else:
        raise ValueError(family)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Folder of a tiny random DINOv2 (28 px input, 2×2 patches of 14)."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-dinov2")


def class_image(label: int, index: int, size: int = 40, seed: int = 0) -> Image.Image:
    """A picture whose colour and stripe direction depend on the class, with per-image noise."""
    rng = np.random.default_rng(seed * 100_003 + label * 1009 + index)
    hue = np.array([(label * 67) % 256, (label * 131 + 80) % 256, (label * 29 + 160) % 256], dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin((xx if label % 2 else yy) * (0.4 + 0.15 * (label % 5)))[..., None]
    arr = hue * (0.6 + 0.4 * stripes) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_image_dataset(
    root: Path, num_classes: int = 4, per_class: int = 5, size: int = 40, seed: int = 0
) -> Path:
    """``root/images/class_k/img_i.png`` plus ``root/records.jsonl`` with relative paths."""
    lines = []
    for label in range(num_classes):
        folder = root / "images" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            p = folder / f"img_{i}.png"
            class_image(label, i, size, seed).save(p)
            lines.append(json.dumps({"image": f"images/class_{label}/img_{i}.png", "label": label}))
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    return root / "records.jsonl"


@pytest.fixture
def image_dataset(tmp_path) -> Path:
    """A JSONL file of 4 classes × 5 generated images."""
    return make_image_dataset(tmp_path / "data")


# The integration layer: modules that run whole commands end to end (training runs, several processes,
# servers, exports with ONNX, the quickstart). `python -m pytest -m "not integration"` is the fast layer.
INTEGRATION_MODULES = {
    "test_training.py",
    "test_training_resume.py",
    "test_training_distributed.py",
    "test_training_selection.py",
    "test_training_mechanics.py",
    "test_segmentation_training.py",
    "test_quickstart.py",
    "test_recipes.py",
    "test_scale_embed.py",
    "test_sharded_retrieval.py",
    "test_stream_sources.py",
    "test_export.py",
    "test_image_text_export.py",
    "test_serve.py",
    "test_handoff.py",
    "test_ray.py",
    "test_bench.py",
    "test_rerank_training.py",
    "test_mining_training.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
