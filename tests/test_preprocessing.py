"""Each family's preprocessing matches its own transformers image processor (built offline from the
hub's config values), the exported preprocessor_config.json reproduces vembed's embeddings on a large
JPEG, and training crops are cut from an image decoded large enough for the model's resolution."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
import transformers as tf
from conftest import save_tiny_model
from PIL import Image

from vembed.data.images import EvalTransform, TrainTransform, load_image
from vembed.data.records import ImageRecord
from vembed.export import export_model
from vembed.inference import embed_records
from vembed.models.factory import load_embedder
from vembed.models.loader import load_spec as resolve_spec
from vembed.models.registry import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    spec_from_config,
)

# the preprocessor_config.json values of the registry models' hub repositories
HUB_PROCESSORS = {
    "dinov2-small": (
        "BitImageProcessor",
        dict(
            size={"shortest_edge": 256},
            crop_size={"height": 224, "width": 224},
            do_center_crop=True,
            resample=3,
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
        ),
    ),
    "clip-vit-b16": (
        "CLIPImageProcessor",
        dict(
            size={"shortest_edge": 224},
            crop_size={"height": 224, "width": 224},
            do_center_crop=True,
            resample=3,
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        ),
    ),
    "siglip-base": (
        "SiglipImageProcessor",
        dict(size={"height": 224, "width": 224}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3),
    ),
    "siglip-so400m": (
        "SiglipImageProcessor",
        dict(size={"height": 384, "width": 384}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3),
    ),
}


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, non-square picture with detail at several scales."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack(
        [128 + 100 * np.sin(xx / 37.0), 128 + 100 * np.cos(yy / 23.0), (xx / 7 + yy / 5) % 256], -1
    )
    arr = arr + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def processor(kind: str, values: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(tf, kind)(**values)


@pytest.mark.parametrize("name", list(HUB_PROCESSORS))
def test_eval_transform_matches_the_familys_image_processor(name):
    kind, values = HUB_PROCESSORS[name]
    spec = resolve_spec(name)
    img = photo(451, 300)
    expected = processor(kind, values)(img, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(EvalTransform(spec)(img), expected, atol=1e-5)
    # the same config read from a hub repository's preprocessor_config.json gives the same spec
    read = spec_from_config(
        {"model_type": spec.family_info.model_types[0]}, name="x", source="x", preprocessor=values
    )
    assert (read.image_size, read.resize_size, read.resize, read.interpolation) == (
        spec.image_size,
        spec.resize_size,
        spec.resize,
        spec.interpolation,
    )


def test_siglip_and_dinov3_resize_to_a_square_without_cropping():
    for name, interpolation in (("siglip-base", "bicubic"), ("dinov3-small", "bilinear")):
        spec = resolve_spec(name)  # DINOv3ViTImageProcessor: 224 x 224, bilinear, no crop (needs torchvision)
        assert (spec.resize, spec.interpolation, spec.resize_size) == ("square", interpolation, 224)
    img = Image.new("RGB", (400, 100), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 40, 100))  # a white band at the far left survives: no crop
    x = EvalTransform(resolve_spec("siglip-base"))(img)
    assert x.shape == (3, 224, 224) and x[:, :, :10].min() > 0.9


@pytest.mark.parametrize("family", ["dinov2", "siglip"])
def test_exported_preprocessor_reproduces_vembeds_embeddings_on_a_large_jpeg(tmp_path, family):
    path = tmp_path / "big.jpg"
    photo(1600, 1200).save(path, quality=90)
    export_model(save_tiny_model(tmp_path / family, family, image_size=56), tmp_path / "out")
    embedder = load_embedder(tmp_path / "out", device="cpu", dtype="float32")
    ours = embed_records(embedder, [ImageRecord(path)], num_workers=0, show_progress=False).embeddings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = tf.AutoImageProcessor.from_pretrained(tmp_path / "out")
    full = Image.open(path).convert("RGB")
    pixels = proc(full, return_tensors="pt")["pixel_values"]
    # decoded at full size, vembed's transform is the processor's; its JPEG draft decode barely moves it
    assert torch.allclose(EvalTransform(embedder.spec)(full), pixels[0], atol=1e-5)
    theirs = embedder.encode(pixels)
    assert torch.nn.functional.cosine_similarity(ours, theirs).item() > 0.9999


def test_training_crops_are_cut_at_or_above_the_input_resolution(tmp_path, monkeypatch):
    spec = resolve_spec("dinov2-small")
    t = TrainTransform(spec, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3))
    assert t.min_decode_size == 438  # 224 / sqrt(0.35 / (4/3))
    path = tmp_path / "big.jpg"
    photo(2000, 1500).save(path, quality=90)
    img = load_image(path, min_size=t.min_decode_size)
    assert min(img.size) >= t.min_decode_size and img.size[0] < 2000  # a reduced JPEG decode
    boxes = []
    resize = Image.Image.resize

    def recording_resize(self, size, resample=None, box=None, **kw):
        boxes.append(box)
        return resize(self, size, resample, box, **kw)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    square = Image.new("RGB", (t.min_decode_size, t.min_decode_size))
    for seed in range(200):
        t(square, random.Random(seed))
    assert min(min(b[2] - b[0], b[3] - b[1]) for b in boxes) >= 224


def test_augmentation_options_act():
    spec = resolve_spec("dinov2-small").replace(image_size=28)
    img = photo(40, 40)
    plain = TrainTransform(spec, scale=(1, 1), ratio=(1, 1), hflip=0)(img, random.Random(0))
    flipped = TrainTransform(spec, scale=(1, 1), ratio=(1, 1), hflip=1)(img, random.Random(0))
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-6)
    upside = TrainTransform(spec, scale=(1, 1), ratio=(1, 1), hflip=0, vflip=1)(img, random.Random(0))
    assert torch.allclose(upside, plain.flip(-2), atol=1e-6)
    grey = TrainTransform(spec, scale=(1, 1), ratio=(1, 1), hflip=0, grayscale=1)(img, random.Random(0))
    std = torch.tensor(spec.std).view(3, 1, 1)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    rgb = grey * std + mean
    assert torch.allclose(rgb[0], rgb[1], atol=1e-5) and torch.allclose(rgb[1], rgb[2], atol=1e-5)
    jitter = TrainTransform(spec, scale=(1, 1), ratio=(1, 1), hflip=0, color_jitter=0.4)
    assert not torch.allclose(jitter(img, random.Random(1)), plain)
    assert torch.equal(jitter(img, random.Random(1)), jitter(img, random.Random(1)))
