"""``vembed visualize pca``: one PCA over every image's patch tokens, its first 3 components as RGB."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import class_image, save_tiny_model
from PIL import Image
from typer.testing import CliRunner

from vembed.cli import app
from vembed.errors import VembedError
from vembed.models.factory import load_embedder
from vembed.visualize import fit_pca, model_pca, patch_tokens, pca_figure


def test_pca_matches_sklearn_and_colours_the_same_part_alike():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    # two images of 4x4 patches, 16-d features: a "foreground" block and a "background" around it
    centre_a, centre_b = rng.normal(0, 3, 16), rng.normal(0, 3, 16)
    feats = []
    for _ in range(2):
        f = centre_b + rng.normal(0, 0.1, (4, 4, 16))
        f[1:3, 1:3] = centre_a + rng.normal(0, 0.1, (2, 2, 16))
        feats.append(torch.tensor(f, dtype=torch.float32))
    result = fit_pca(feats, "m")
    flat = torch.cat([f.reshape(-1, 16) for f in feats]).numpy()
    reference = PCA(n_components=3).fit(flat)
    assert np.allclose(result.explained, reference.explained_variance_ratio_, atol=1e-5)
    for m in result.maps:
        assert m.shape == (4, 4, 3) and m.min() >= 0 and m.max() <= 1
    fg = np.concatenate([m[1:3, 1:3].reshape(-1, 3) for m in result.maps])
    bg = np.concatenate([m[[0, 3]].reshape(-1, 3) for m in result.maps])
    # the first component separates the two parts; each part has nearly one colour across both images
    assert abs(fg[:, 0].mean() - bg[:, 0].mean()) > 0.8
    assert fg[:, 0].std() < 0.1 and bg[:, 0].std() < 0.1


def test_too_few_patches_is_an_error():
    with pytest.raises(VembedError, match="PCA needs at least 3"):
        fit_pca([torch.zeros(1, 2, 8)], "m")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pca")
    a = save_tiny_model(root / "a", image_size=56)
    b = save_tiny_model(root / "b", family="dinov2_with_registers", seed=1, image_size=56)
    for i in range(3):
        class_image(i, i, size=64).save(root / f"img{i}.png")
    return root, a, b


def test_patch_tokens_drop_the_prefix_tokens(models):
    _, _, b = models
    embedder = load_embedder(b, device="cpu", dtype="float32")
    tokens = patch_tokens(embedder, torch.randn(2, 3, 56, 56))
    assert tokens.shape == (2, 4, 4, 32)  # 56 / 14 = 4 patches a side; CLS and 4 registers dropped


def test_one_pca_over_all_images_together(models):
    root, a, _ = models
    embedder = load_embedder(a, device="cpu", dtype="float32")
    images = [Image.open(root / f"img{i}.png").convert("RGB") for i in range(3)]
    result, seen = model_pca(embedder, images, name="a")
    assert [s.size for s in seen] == [(56, 56)] * 3
    joint = fit_pca([patch_tokens(embedder, _pixels(embedder, img))[0] for img in images])
    for mine, hand in zip(result.maps, joint.maps, strict=True):
        assert np.allclose(mine, hand, atol=1e-5)
    alone = fit_pca([patch_tokens(embedder, _pixels(embedder, images[0]))[0]])
    assert not np.allclose(alone.maps[0], result.maps[0], atol=1e-3)  # not one PCA per image


def _pixels(embedder, img):
    from vembed.data.images import EvalTransform

    return EvalTransform(embedder.spec)(img)[None]


def test_figure_has_a_row_per_image_and_a_column_per_model():
    maps = [np.full((2, 2, 3), 0.5, np.float32)] * 2
    from vembed.visualize import PatchPCA

    results = [PatchPCA("before", maps, [0.5, 0.2, 0.1]), PatchPCA("after", maps, [0.6, 0.2, 0.1])]
    fig = pca_figure([Image.new("RGB", (28, 28))] * 2, results, labels=["x.png", "y.png"])
    assert len(fig.axes) == 6
    assert [fig.axes[i].get_title().split("\n")[0] for i in range(3)] == ["image", "before", "after"]
    assert all(len(ax.get_images()) == 1 for ax in fig.axes)


def test_cli_writes_the_picture_with_compare(models, tmp_path):
    root, a, b = models
    out = tmp_path / "pca.png"
    args = ["visualize", "pca", str(a), str(root / "img0.png"), str(root), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--compare", str(b), "--max-images", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "drawing the first 3 of 4 images" in result.output
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.size[1] > picture.size[0]  # 3 rows of 3 columns, + titles
    missing = CliRunner().invoke(app, ["visualize", "pca", str(a), str(tmp_path / "nope"), "--out", str(out)])
    assert missing.exit_code == 2 and "source not found" in missing.output
