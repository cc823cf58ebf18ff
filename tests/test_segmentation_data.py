"""Segmentation records, masks, joint augmentation and the segmenter's feature maps."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from PIL import Image

from vembed.data.images import load_mask
from vembed.data.records import SegRecord, read_records, record_to_json
from vembed.errors import VembedError
from vembed.models.loader import load_backbone
from vembed.models.loader import load_spec as resolve_spec
from vembed.models.segmenter import Segmenter, fit_to_patch, fpn_layers
from vembed.tasks.segmentation.data import SegEvalTransform, SegmentationImages, SegTrainTransform

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def pattern(h: int, w: int) -> tuple[Image.Image, np.ndarray]:
    """Blocks whose class is coded in the red channel (class k → red 60 k)."""
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2, : w // 3] = 1
    mask[h // 2 :, w // 3 :] = 2
    mask[:, -3:] = 3
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = mask * 60
    return Image.fromarray(img, "RGB"), mask


def decode(pixels: torch.Tensor) -> torch.Tensor:
    red = pixels[0] * STD[0] + MEAN[0]  # back to [0, 1]
    return torch.round(red * 255 / 60).long()


def test_augmentation_keeps_image_and_mask_aligned():
    img, mask = pattern(45, 70)
    transform = SegTrainTransform(28, MEAN, STD, "bilinear", zoom=(0.5, 2.0))
    rng = random.Random(0)
    for _ in range(20):
        pixels, target = transform(img, mask, rng)
        assert pixels.shape == (3, 28, 28) and target.shape == (28, 28) and target.dtype == torch.int64
        assert set(target.unique().tolist()) <= {0, 1, 2, 3, 255}  # nearest only: no blended labels
        valid = target != 255
        agree = (decode(pixels)[valid] == target[valid]).float().mean()
        assert agree > 0.9  # only the bilinear edges of the image may differ
    a, b = transform(img, mask, random.Random(5)), transform(img, mask, random.Random(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # seeded: the same crop
    padded = SegTrainTransform(28, MEAN, STD, zoom=(0.3, 0.3))(img, mask)[1]
    assert (padded == 255).any()  # a crop beyond the scaled image is ignored, not labelled background


def test_eval_transform_resizes_mask_with_nearest():
    img, mask = pattern(30, 50)
    pixels, target = SegEvalTransform(42, MEAN, STD)(img, mask)
    assert pixels.shape == (3, 42, 42) and target.shape == (42, 42)
    assert set(target.unique().tolist()) == {0, 1, 2, 3}
    assert fit_to_patch(300, 14) == 294 and fit_to_patch(308, 14) == 308 and fit_to_patch(5, 14) == 14


def test_segmentation_records_and_dataset_checks(tmp_path):
    img, mask = pattern(20, 30)
    img.save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    (tmp_path / "r.jsonl").write_text('{"image": "a.png", "mask": "a_mask.png"}\n')
    records = read_records(tmp_path / "r.jsonl")
    rec = records.masks()[0]
    assert record_to_json(rec, relative_to=tmp_path) == {"image": "a.png", "mask": "a_mask.png"}
    assert records.images()[0].image == rec.image
    data = SegmentationImages(records.masks(), SegEvalTransform(28, MEAN, STD), num_classes=4)
    assert data[0][1].shape == (28, 28)
    with pytest.raises(VembedError, match="holds class 3, but there are 3 classes"):
        SegmentationImages(records.masks(), SegEvalTransform(28, MEAN, STD), num_classes=3)[0]
    (tmp_path / "missing.jsonl").write_text('{"image": "a.png", "mask": "nope.png"}\n')
    with pytest.raises(VembedError, match=r"missing.jsonl:1: mask not found"):
        read_records(tmp_path / "missing.jsonl")
    Image.new("L", (10, 10)).save(tmp_path / "small.png")
    bad = SegmentationImages([SegRecord(tmp_path / "a.png", tmp_path / "small.png")], lambda i, m: (i, m))
    with pytest.raises(VembedError, match="small.png is 10x10 but image .*a.png is 30x20"):
        bad[0]
    Image.new("RGB", (30, 20)).save(tmp_path / "rgb.png")
    with pytest.raises(VembedError, match="RGB image .*one-channel PNGs"):
        load_mask(tmp_path / "rgb.png")


@pytest.mark.parametrize("family", ["dinov2", "dinov2_with_registers", "siglip"])
@pytest.mark.parametrize("decoder", ["linear", "fpn"])
def test_segmenter_drops_prefix_tokens_and_upsamples_to_the_input(tmp_path, family, decoder):
    spec = resolve_spec(save_tiny_model(tmp_path / family, family))
    model = Segmenter(load_backbone(spec), spec, num_classes=3, decoder=decoder)
    pixels = torch.randn(2, 3, 28, 42)
    assert model(pixels).shape == (2, 3, 28, 42)
    maps = model.feature_maps(pixels)
    assert len(maps) == (4 if decoder == "fpn" else 1) and maps[-1].shape == (2, 32, 2, 3)
    kwargs = {"interpolate_pos_encoding": True} if family == "siglip" else {}
    tokens = model.backbone(pixel_values=pixels, **kwargs).last_hidden_state
    prefix = {"dinov2": 1, "dinov2_with_registers": 5, "siglip": 0}[family]
    assert torch.allclose(maps[-1][:, :, 1, 2], tokens[:, prefix + 1 * 3 + 2])


def test_fpn_layers_and_bad_decoder():
    assert (
        fpn_layers(12) == [3, 6, 9, 12]
        and fpn_layers(24) == [6, 12, 18, 24]
        and fpn_layers(2) == [1, 1, 2, 2]
    )
    with pytest.raises(VembedError, match="model.decoder: unknown decoder 'unet'"):
        Segmenter(torch.nn.Identity(), None, num_classes=3, decoder="unet")


def test_segmentation_training_applies_every_train_augment_key(tmp_path):
    from types import SimpleNamespace

    from vembed.settings import load_settings
    from vembed.tasks.segmentation.training import MaskRecords, seg_loaders

    img, mask = pattern(40, 40)
    img.save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    data = MaskRecords([SegRecord(tmp_path / "a.png", tmp_path / "a_mask.png")], ["0", "1", "2", "3"])
    segmenter = SimpleNamespace(
        spec=SimpleNamespace(image_size=28, mean=MEAN, std=STD, interpolation="bilinear")
    )
    plain = SegEvalTransform(28, MEAN, STD, "bilinear")(img, mask)

    def batch(*keys):
        whole = ["train.augment.scale=1,1", "train.augment.ratio=1,1", "train.augment.hflip=0"]
        settings = load_settings(None, ["train.task=segmentation", "data.num_workers=0", *whole, *keys])
        return next(iter(seg_loaders(data, segmenter=segmenter, settings=settings).epoch([[0] * 6], 0)))

    pixels, masks = batch("train.augment.hflip=1")  # geometry: image and mask flipped together
    assert all(torch.equal(m, plain[1].flip(-1)) for m in masks)
    assert torch.allclose(pixels, plain[0].flip(-1).expand_as(pixels), atol=1e-5)
    pixels, masks = batch("train.augment.vflip=1")
    assert all(torch.equal(m, plain[1].flip(-2)) for m in masks)
    assert torch.allclose(pixels, plain[0].flip(-2).expand_as(pixels), atol=1e-5)
    pixels, masks = batch("train.augment.grayscale=1")  # colour: the image only
    assert all(torch.equal(m, plain[1]) for m in masks)
    assert torch.allclose(pixels[:, 0], pixels[:, 1]) and not torch.allclose(
        pixels, plain[0].expand_as(pixels)
    )
    pixels, masks = batch("train.augment.color_jitter=0.5")
    assert all(torch.equal(m, plain[1]) for m in masks) and not torch.allclose(pixels[0], pixels[1])
    pixels, masks = batch("train.augment.scale=0.2,0.5", "train.augment.ratio=0.75,1.33")  # crops of the area
    assert set(masks.unique().tolist()) <= {0, 1, 2, 3} and not torch.equal(masks[0], plain[1])
    for p, m in zip(pixels, masks, strict=True):
        assert (decode(p) == m).float().mean() > 0.9  # nearest masks stay on the image's blocks

    from vembed.tasks import get_task

    def augment(*overrides):  # train.augment with the task's defaults for the keys left null
        settings = load_settings(None, list(overrides))
        return get_task(settings.train.task).augment(settings)

    seg = augment("train.task=segmentation")  # segmentation's own defaults
    assert (seg.enabled, seg.scale, seg.hflip) == (True, None, 0.5)  # on by default, unlike retrieval
    assert not augment("train.task=segmentation", "train.augment=false").enabled
    assert (augment().enabled, augment().scale, augment().hflip) == (False, (0.9, 1.0), 0.0)
    assert augment("train.augment.scale=null").scale == (0.9, 1.0)
