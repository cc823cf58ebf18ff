import json

import pytest
import torch
from conftest import save_tiny_model
from typer.testing import CliRunner

from vembed.cli import app
from vembed.errors import VembedError
from vembed.models import loader
from vembed.models.factory import create_embedder, save_model
from vembed.models.loader import load_spec as resolve_spec
from vembed.models.registry import REGISTRY, list_models
from vembed.settings import ModelSettings

REQUIRED = [
    "dinov2-small",
    "dinov2-base",
    "dinov2-large",
    "dinov2-giant",
    "dinov2-base-reg",
    "dinov3-small",
    "dinov3-base",
    "dinov3-large",
    "clip-vit-b32",
    "clip-vit-b16",
    "clip-vit-l14",
    "siglip-base",
    "siglip-so400m",
]


def test_registry_has_the_promised_models():
    assert set(REQUIRED) <= set(REGISTRY)
    spec = resolve_spec("dinov2-base")
    assert (spec.source, spec.family, spec.image_size, spec.patch_size, spec.embed_dim) == (
        "facebook/dinov2-base",
        "dinov2",
        224,
        14,
        768,
    )
    assert spec.resize_size == 256 and spec.mean == (0.485, 0.456, 0.406)
    assert resolve_spec("siglip-base").pooling == "pooler"


def test_unknown_name_lists_close_matches():
    with pytest.raises(VembedError, match="unknown model 'dinov2-smal'.*dinov2-small"):
        resolve_spec("dinov2-smal")


def test_hub_id_reads_config_through_the_hub(monkeypatch, tmp_path):
    import transformers

    repo = tmp_path / "hub"
    repo.mkdir()
    transformers.Dinov2Config(hidden_size=48, patch_size=14, image_size=518).save_pretrained(repo)
    calls = []

    def fake_hub_file(hub_id, filename, *, revision=None, required=False):  # the network boundary
        calls.append((hub_id, filename))
        return repo / filename if (repo / filename).is_file() else None

    monkeypatch.setattr(loader, "hub_file", fake_hub_file)
    spec = resolve_spec("someone/custom-dinov2")
    assert calls[0] == ("someone/custom-dinov2", "config.json")
    assert (spec.family, spec.embed_dim, spec.image_size) == ("dinov2", 48, 224)


@pytest.mark.parametrize("family", ["dinov2", "dinov2_with_registers", "clip", "siglip", "dinov3", "vit"])
def test_local_directory_of_each_family_embeds(tmp_path, family):
    path = save_tiny_model(tmp_path / family, family)
    embedder = create_embedder(str(path))
    assert embedder.spec.family == family and embedder.spec.image_size == 28
    x = torch.randn(3, 3, 28, 28)
    out = embedder.encode(x)
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_register_tokens_are_not_patches(tmp_path):
    path = save_tiny_model(tmp_path / "reg", "dinov2_with_registers")
    embedder = create_embedder(str(path), ModelSettings(pooling="mean"))
    assert embedder.num_prefix_tokens == 5  # CLS + 4 registers
    hidden = torch.randn(2, 5 + 4, 32)
    out = type("O", (), {"last_hidden_state": hidden})()
    assert torch.allclose(embedder.pool(out), hidden[:, 5:].mean(1))


@pytest.mark.parametrize("pooling,dim", [("cls", 32), ("mean", 32), ("cls+mean", 64), ("gem", 32)])
def test_poolings_and_projection(tiny_model, pooling, dim):
    emb = create_embedder(str(tiny_model), ModelSettings(pooling=pooling))
    assert emb.encode(torch.randn(2, 3, 28, 28)).shape == (2, dim)
    proj = create_embedder(str(tiny_model), ModelSettings(pooling=pooling, projection_dim=8))
    assert proj.encode(torch.randn(2, 3, 28, 28)).shape == (2, 8)


def test_cls_pooling_on_siglip_is_refused(tmp_path):
    path = save_tiny_model(tmp_path / "sig", "siglip")
    with pytest.raises(VembedError, match="needs a CLS token"):
        create_embedder(str(path), ModelSettings(pooling="cls"))


@pytest.mark.parametrize("family", ["vit", "vit_google"])
def test_pooler_pooling_on_vit_is_refused(tmp_path, family):
    """vembed loads ViTModel without its pooler (DINO has none, google's is a classifier layer)."""
    path = save_tiny_model(tmp_path / family, family)
    with pytest.raises(VembedError, match="needs a pooler layer.*use 'cls' or 'mean'"):
        create_embedder(str(path), ModelSettings(pooling="pooler"))


def test_saved_embedder_round_trips_with_head(tiny_model, tmp_path):
    emb = create_embedder(str(tiny_model), ModelSettings(pooling="gem", projection_dim=8))
    torch.nn.init.normal_(emb.projection.weight)
    out = save_model(emb, tmp_path / "saved")
    meta = json.loads((out / "vembed.json").read_text())
    assert meta["pooling"] == "gem" and meta["projection_dim"] == 8
    again = create_embedder(str(out))
    x = torch.randn(4, 3, 28, 28)
    assert torch.allclose(emb.encode(x), again.encode(x), atol=1e-6)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(VembedError, match="no config.json"):
        resolve_spec(str(tmp_path))


def test_models_command_lists_registry():
    result = CliRunner().invoke(app, ["models"], terminal_width=200)
    assert result.exit_code == 0
    for spec in list_models():
        assert spec.name in result.output


def test_models_piped_is_tab_separated_with_every_column():
    result = CliRunner().invoke(app, ["models"])  # CliRunner's stdout is not a terminal
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split("\t") == [
        "name",
        "hub id",
        "dim",
        "size",
        "patch",
        "pooling",
        "family",
        "description",
    ]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert len(rows) == len(list_models())
    for spec in list_models():
        assert rows[spec.name][1:4] == [spec.source, str(spec.embed_dim), str(spec.image_size)]
        assert rows[spec.name][-1] == spec.description


@pytest.mark.parametrize("width", [80, 100, 200])
def test_models_table_fits_the_terminal_and_keeps_the_useful_columns(width):
    import io

    from rich.console import Console

    from vembed.cli.inspect import _model_rows, models_table

    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    console.print(models_table(_model_rows(), width))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= width
    header = next(line for line in lines if line.lstrip().startswith("name"))
    for column in ("hub id", "dim", "size", "patch"):  # at 80 columns before: name and hub id only
        assert column in header
    text = out.getvalue()
    for spec in list_models():
        assert spec.source in text  # the hub id is never cut
    if width >= 200:
        assert "description" in header and "left out" not in text
    else:
        assert "left out at" in text
