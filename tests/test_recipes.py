"""Every recipe in recipes/ validates, and the seed recipe says what the seed result used."""

from pathlib import Path

import pytest

from vembed.compat import is_factory_config
from vembed.recipe_files import read_recipe
from vembed.settings import load_settings

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_the_promised_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {
        "sop_dinov2_base_lora.yaml",
        "flowers102_clip_arcface.yaml",
        "linear_probe_dinov2_small.yaml",
        "tiny_cpu.yaml",
        "factory_example.yaml",
        "cotton_dinov2s_linear_probe.yaml",
        "cotton_dinov2s_full_ft.yaml",
        "sop_dino_vits16_oml.yaml",
    } <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_trains_with_labels(recipe):
    settings = load_settings(recipe)
    assert settings.data.train is not None and settings.data.val is not None
    assert settings.data.val != settings.data.test  # checkpoints are never chosen on the test split
    assert settings.train.output_dir.parts[0] == "runs"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_overrides_apply_on_top_of_every_recipe(recipe):
    settings = load_settings(recipe, ["train.epochs=1", "train.batch_size=8"])
    assert settings.train.epochs == 1 and settings.train.batch_size == 8


def test_sop_recipe_is_the_seed_setting():
    s = load_settings(RECIPES[0].parent / "sop_dinov2_base_lora.yaml")
    assert s.model.name == "dinov2-base"
    assert (s.train.method, s.train.loss, s.train.epochs, s.train.batch_size, s.train.lr) == (
        "lora",
        "infonce",
        4,  # the published 2 epochs of pairs: an epoch here draws each image once
        128,
        1e-4,
    )
    assert str(s.data.train) == "data/sop/train.jsonl" and str(s.data.test) == "data/sop/test.jsonl"
    assert 1 in s.eval.k


def test_factory_example_is_the_same_seed_setting():
    folder = RECIPES[0].parent
    assert is_factory_config(_read_yaml_raw(folder / "factory_example.yaml"))
    factory = load_settings(folder / "factory_example.yaml")
    native = load_settings(folder / "sop_dinov2_base_lora.yaml")
    from vembed.models.loader import resolve_ref

    assert resolve_ref(factory.model.name).name == resolve_ref(native.model.name).name  # the same model
    for section, key in [
        ("data", "train"),
        ("data", "val"),
        ("train", "method"),
        ("train", "loss"),
        ("train", "epochs"),
        ("train", "batch_size"),
        ("train", "lr"),
        ("train", "temperature"),
    ]:
        assert getattr(getattr(factory, section), key) == getattr(getattr(native, section), key), key
    assert factory.train.lora.r == native.train.lora.r


def test_recipes_name_distinct_run_dirs():
    dirs = [load_settings(p).train.output_dir for p in RECIPES]
    assert len(set(dirs)) == len(dirs)


def _read_yaml_raw(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_read_yaml_maps_factory_configs(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("model_name: facebook/dinov2-small\nretrieval_mode: i2i\n")
    from vembed.models.loader import resolve_ref

    name = read_recipe(path)["model"]["name"]
    assert name == "facebook/dinov2-small" and resolve_ref(name).name == "dinov2-small"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_trains_two_steps_on_a_tiny_model(recipe, tiny_model, tmp_path):
    """Each recipe's combination of method, loss and options is one the training loop accepts and runs:
    only the model, the data and the sizes are swapped for tiny ones."""
    from conftest import make_image_dataset

    from vembed.models.factory import create_embedder
    from vembed.training import train

    task = load_settings(recipe).train.task
    segmentation = task == "segmentation"
    model_name = str(tiny_model)
    if task == "image_text":  # a tiny CLIP with its tokenizer, captioned digits
        from dual_helpers import captioned_digits, save_tiny_dual

        model_name = str(save_tiny_dual(tmp_path / "clip", "clip"))
        train_file, val_file = captioned_digits(tmp_path / "captions", count=60)
    elif segmentation:  # image + mask records and classes.txt, from the segfolder prepare
        from vembed.data.prepare import prepare_segfolder
        from vembed.data.shapes import write_shapes

        write_shapes(tmp_path / "shapes", count=12, size=28)
        prepare_segfolder(tmp_path / "shapes", tmp_path / "seg", val_ratio=0.25, test_ratio=0)
        train_file, val_file = tmp_path / "seg" / "train.jsonl", tmp_path / "seg" / "val.jsonl"
    else:
        train_file = make_image_dataset(tmp_path / "train", num_classes=4, per_class=6)
        val_file = make_image_dataset(tmp_path / "val", num_classes=3, per_class=3, seed=1)
    settings = load_settings(
        recipe,
        values={
            "model.name": model_name,
            "model.image_size": None,
            "model.device": "cpu",
            "data.train": str(train_file),
            "data.val": str(val_file),
            "data.test": None,
            "data.num_workers": 0,
            "train.output_dir": str(tmp_path / "run"),
            "train.batch_size": 8,
            "train.samples_per_class": None,  # P x K sizes follow the tiny batch; the records have no category
            "train.categories_per_batch": None,
            "train.max_steps": 2,
            "train.precision": "no",
            "train.grad_cache_chunk": None,
            "eval.k": [1],
        },
    )
    result = train(settings, show_progress=False)
    assert result.steps == 2
    if segmentation:
        from vembed.models.segmenter import create_segmenter

        assert create_segmenter(result.final_dir).decoder_name == settings.model.decoder
        return
    model = create_embedder(str(result.final_dir))
    if task == "image_text":  # the image tower alone: the dual encoder's projected image embeddings
        assert model.embed_dim == 24
        return
    assert model.embed_dim == (settings.model.projection_dim or 32)


def test_cotton_recipes_say_what_the_study_did():
    folder = RECIPES[0].parent
    linear = load_settings(folder / "cotton_dinov2s_linear_probe.yaml")
    full = load_settings(folder / "cotton_dinov2s_full_ft.yaml")
    assert linear.model.name == full.model.name == "dinov2-small"
    assert (linear.train.method, linear.train.loss, linear.train.lr) == ("frozen", "ce", 5e-4)
    assert (linear.train.batch_size, linear.train.epochs) == (32, 20)
    assert linear.train.cache_features and not linear.model.normalize  # the head sees raw CLS features
    assert (full.train.method, full.train.loss, full.train.lr, full.train.epochs) == ("full", "ce", 1e-4, 20)


def test_oml_recipe_is_open_metric_learnings_sop_setting():
    """recipes/sop_dino_vits16_oml.yaml: DINO ViT-S/16, triplet 0.15 + hard miner, 32 x 6 from 3 categories."""
    from vembed.models.registry import REGISTRY

    s = load_settings(RECIPES[0].parent / "sop_dino_vits16_oml.yaml")
    assert REGISTRY[s.model.name].source == "facebook/dino-vits16"
    t = s.train
    assert (t.method, t.loss, t.margin, t.mining, t.lr, t.weight_decay) == (
        "full",
        "triplet",
        0.15,
        "hard",
        1e-5,
        0,
    )
    assert (t.batch_size // t.samples_per_class, t.samples_per_class, t.categories_per_batch) == (32, 6, 3)
    assert (
        t.select_metric == "recall@1"
        and "86.6" in (RECIPES[0].parent / "sop_dino_vits16_oml.yaml").read_text()
    )
