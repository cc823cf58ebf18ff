"""One model identity: the precedence rule (local folder > registry name > hub id), one vembed.json
reader/writer, the hub read like a folder (network boundary mocked), and export writing what it read."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_model

from vembed.errors import VembedError
from vembed.export import export_model
from vembed.models import loader
from vembed.models.factory import create_embedder, load_embedder, save_model
from vembed.models.heads import ClassifierHead
from vembed.models.loader import load_model, read_model_config, resolve_ref, write_model_config


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Hub ids → local folders; every request is recorded; an unknown id is a connection failure."""
    repos: dict = {}
    calls: list = []

    def hub_file(hub_id, filename, *, revision=None, required=False):
        calls.append((hub_id, filename))
        if hub_id not in repos:
            raise VembedError(f"cannot load {filename} of {hub_id!r} from the Hugging Face Hub (offline)")
        path = repos[hub_id] / filename
        return path if path.is_file() else None

    monkeypatch.setattr(loader, "hub_file", hub_file)
    return repos, calls


def test_an_existing_folder_wins_over_registry_and_hub(tiny_model, tmp_path, monkeypatch, fake_hub):
    _, calls = fake_hub
    monkeypatch.chdir(tmp_path)
    save_tiny_model(tmp_path / "dinov2-small")  # a folder named like a registry model
    save_tiny_model(tmp_path / "org" / "name")  # and one named like a hub id
    assert resolve_ref("dinov2-small").kind == "folder"
    assert load_model("dinov2-small", weights=False).spec.embed_dim == 32  # not the registry's 384
    assert load_model("org/name", weights=False).spec.source == "org/name"
    assert calls == []
    assert resolve_ref("dinov2-base").kind == "registry"
    assert resolve_ref("someone/model").kind == "hub"


@pytest.mark.parametrize("ref", ["runs/x/final", "./missing", "~/nope-vembed-model", "a/b/c"])
def test_a_missing_path_is_no_such_folder_not_a_connection_error(ref, fake_hub):
    _, calls = fake_hub
    with pytest.raises(VembedError, match="no such model folder"):
        load_model(ref)
    assert calls == []


def test_a_hub_id_that_cannot_be_reached_names_the_hub(fake_hub):
    with pytest.raises(VembedError, match="from the Hugging Face Hub"):
        load_model("runs/final", weights=False)


def test_a_run_directory_means_its_final_model(tiny_model, tmp_path):
    save_model(load_embedder(tiny_model), tmp_path / "run" / "final")
    ref = resolve_ref(tmp_path / "run")
    assert ref.name == str(tmp_path / "run" / "final") and ref.run_dir == tmp_path / "run"


def test_a_hub_ids_preprocessor_config_is_honoured_like_a_folders(tmp_path, fake_hub):
    repos, _ = fake_hub
    repo = save_tiny_model(tmp_path / "repo")
    (repo / "preprocessor_config.json").write_text(
        json.dumps(
            {"crop_size": {"height": 42, "width": 42}, "image_mean": [0.1, 0.2, 0.3], "image_std": [1, 1, 1]}
        )
    )
    repos["someone/tiny"] = repo
    hub = load_model("someone/tiny", weights=False).spec
    local = load_model(repo, weights=False).spec
    assert (hub.image_size, hub.mean, hub.std) == (42, (0.1, 0.2, 0.3), (1, 1, 1))
    assert (local.image_size, local.mean) == (hub.image_size, hub.mean)


def test_a_hub_model_saved_by_vembed_brings_its_identity_and_head(tiny_model, tmp_path, fake_hub):
    repos, _ = fake_hub
    saved = save_model(load_embedder(tiny_model, pooling="gem", projection_dim=8), tmp_path / "saved")
    repos["someone/vembed-model"] = saved
    hub = load_model("someone/vembed-model", weights=False)
    local = load_model(saved, weights=False)
    assert hub.spec.pooling == local.spec.pooling == "gem"
    assert hub.config.projection_dim == 8 and set(hub.head_state) == set(local.head_state)
    assert torch.equal(hub.head_state["projection.weight"], local.head_state["projection.weight"])


def test_vembed_json_round_trips_unknown_keys_and_a_task_head(tmp_path):
    data = {
        "pooling": "mean",
        "projection_dim": None,
        "preprocessing": {"image_size": 28},
        "task_head": {"kind": "classifier", "labels": ["cat", "dog"]},
        "training": {"step": 3},
        "future_key": [1, 2],
    }
    (tmp_path / "vembed.json").write_text(json.dumps(data))
    config = read_model_config(tmp_path)
    assert config.pooling == "mean" and config.task_head["labels"] == ["cat", "dog"]
    assert config.extra == {"training": {"step": 3}, "future_key": [1, 2]}
    write_model_config(tmp_path / "copy", config)
    assert read_model_config(tmp_path / "copy") == config
    assert read_model_config(tmp_path / "nothing") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "vembed.json").write_text("[1]")
    with pytest.raises(VembedError, match="vembed.json: expected a JSON object"):
        read_model_config(tmp_path / "bad")


def test_export_writes_exactly_what_it_reads(tiny_model, tmp_path):
    embedder = load_embedder(tiny_model, pooling="cls+mean", projection_dim=4)
    head = ClassifierHead(4, ["a", "b", "c"])
    src = save_model(embedder, tmp_path / "src", extra={"training": {"step": 7}}, head=head)
    export_model(src, tmp_path / "out")
    before, after = load_model(src, weights=False), load_model(tmp_path / "out", weights=False)
    assert after.task_head == head.config() and after.config.extra["training"] == {"step": 7}
    assert after.config.base_model == before.config.base_model == str(tiny_model)
    assert set(after.task_head_state) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(after.task_head_state["classifier.weight"], head.classifier.weight)
    for key in ("pooling", "projection_dim", "normalize", "embed_dim", "preprocessing", "lora_targets"):
        assert getattr(after.config, key) == getattr(before.config, key), key
    x = torch.randn(2, 3, 28, 28)
    assert torch.allclose(load_embedder(src).encode(x), load_embedder(tmp_path / "out").encode(x), atol=1e-6)


def test_every_loader_honours_what_the_model_folder_says(tiny_model, tmp_path):
    """A model trained with model.normalize=false (the cotton recipes) keeps raw embeddings wherever it
    is loaded with default settings: embed, classify and eval build it from ModelSettings(), whose
    normalize is null (the folder's), not true. An export says the same."""
    from vembed.settings import ModelSettings

    raw = load_embedder(tiny_model, normalize=False, device="cpu", dtype="float32")
    saved = save_model(raw, tmp_path / "final")
    export_model(saved, tmp_path / "export")
    batch = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    for folder in (saved, tmp_path / "export"):
        embedder = create_embedder(folder, ModelSettings(device="cpu", dtype="float32"))
        assert embedder.normalize is False
        norms = embedder.encode(batch).norm(dim=-1)
        assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
        assert torch.allclose(embedder.encode(batch), raw.encode(batch), atol=1e-5)
    # an explicit setting still wins over the folder
    assert create_embedder(saved, ModelSettings(normalize=True, device="cpu")).normalize is True
