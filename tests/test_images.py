import io

import numpy as np
import pytest
import torch
from PIL import Image

from vembed.data.images import EvalTransform, TrainTransform, load_image, to_rgb
from vembed.errors import VembedError
from vembed.models.loader import load_spec as resolve_spec


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(p)  # pure red in CMYK
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (20, 10)
    r, g, b = img.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "deep.png"
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")
    value = load_image(p).getpixel((0, 0))[0]
    assert 120 <= value <= 135  # clipping would give 255


def test_rgba_is_composited_on_white_and_grey_expands(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    grey = Image.new("L", (4, 4), 77)
    assert to_rgb(grey).getpixel((1, 1)) == (77, 77, 77)


def test_exif_orientation_is_applied(tmp_path):
    p = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (30, 10), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(p, exif=exif)
    assert load_image(p).size == (10, 30)


def test_jpeg_draft_keeps_at_least_the_requested_size(tmp_path):
    p = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1000), "blue").save(p, quality=90)
    img = load_image(p, min_size=224)
    assert min(img.size) >= 224 and img.size[0] < 2000


@pytest.mark.parametrize("content,name", [(b"", "empty.jpg"), (b"hello", "text.png")])
def test_undecodable_files_name_the_path(tmp_path, content, name):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(VembedError, match=f"cannot decode image .*{name}"):
        load_image(p)


def test_truncated_jpeg_is_an_error(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    p = tmp_path / "truncated.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(VembedError, match="cannot decode image .*truncated.jpg"):
        load_image(p)


def test_missing_file(tmp_path):
    with pytest.raises(VembedError, match="image not found"):
        load_image(tmp_path / "nope.png")


def test_eval_transform_follows_the_spec():
    spec = resolve_spec("dinov2-small")
    t = EvalTransform(spec)
    x = t(Image.new("RGB", (300, 400), (124, 116, 104)))  # ≈ the ImageNet mean colour
    assert x.shape == (3, 224, 224)
    assert x.abs().max() < 0.05
    clip = EvalTransform(resolve_spec("clip-vit-b16"))
    assert clip.resize_size == 224  # CLIP: resize to 224 then crop 224


def test_train_transform_shape_and_randomness():
    spec = resolve_spec("dinov2-small").replace(image_size=28)
    t = TrainTransform(spec, scale=(0.5, 1.0))  # room for crops of a 70x50 image
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    a, b = t(img), t(img)
    assert a.shape == b.shape == (3, 28, 28)
    assert not torch.equal(a, b)
