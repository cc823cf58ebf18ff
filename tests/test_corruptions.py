"""ImageNet-C corruptions: deterministic under a seed, shape and dtype kept, severity matters."""

from __future__ import annotations

import numpy as np
import pytest

from vembed.errors import VembedError
from vembed.tasks.segmentation.corruptions import CORRUPTIONS, corrupt, parse_corruptions

IMAGE = np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8)
_XX, _YY = np.meshgrid(np.linspace(0, 255, 44), np.linspace(0, 255, 30))
SMOOTH = np.stack([_XX, _YY, np.full((30, 44), 128.0)], -1).astype(np.uint8)


def test_the_fourteen_imagenet_c_families_of_the_issue_are_there():
    assert set(CORRUPTIONS) == {
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_is_deterministic_and_keeps_shape_and_dtype(name):
    for severity in (1, 5):
        a = corrupt(IMAGE, name, severity, seed=3)
        b = corrupt(IMAGE, name, severity, seed=3)
        assert a.shape == IMAGE.shape and a.dtype == np.uint8
        assert np.array_equal(a, b)
    assert not np.array_equal(corrupt(SMOOTH, name, 5, seed=0), SMOOTH)
    if name == "elastic_transform":
        return  # ImageNet-C's levels 1-2 jitter the affine more than 3-5: not monotonic by design
    # the highest severity moves the image further than the lowest
    d1 = np.abs(corrupt(SMOOTH, name, 1, seed=0).astype(int) - SMOOTH).mean()
    d5 = np.abs(corrupt(SMOOTH, name, 5, seed=0).astype(int) - SMOOTH).mean()
    assert d5 >= d1


def test_input_is_not_modified_and_seed_changes_random_corruptions():
    before = IMAGE.copy()
    a = corrupt(IMAGE, "gaussian_noise", 3, seed=0)
    assert np.array_equal(IMAGE, before)
    assert not np.array_equal(a, corrupt(IMAGE, "gaussian_noise", 3, seed=1))


def test_bad_names_and_severities_are_one_line_errors():
    assert parse_corruptions("all") == list(CORRUPTIONS)
    assert parse_corruptions("fog, snow") == ["fog", "snow"]
    with pytest.raises(VembedError, match="did you mean gaussian_noise"):
        parse_corruptions("gausian_noise")
    with pytest.raises(VembedError, match="severity must be 1-5"):
        corrupt(IMAGE, "fog", 6)
