"""vembed-factory's flat YAML configs: mapped onto vembed's settings with a note, or one clear error."""

import pytest
from typer.testing import CliRunner

from vembed.cli import app
from vembed.compat import FACTORY_KEYS, is_factory_config, translate_factory_config
from vembed.errors import VembedError
from vembed.settings import load_settings

# examples/dinov2_i2i.yaml of vembed-factory, as its users have it
FACTORY_SOP = """\
model_name: facebook/dinov2-base
retrieval_mode: i2i
use_lora: true
data_path: data/stanford_online_products/train.jsonl
val_data_path: data/stanford_online_products/val.jsonl
image_root: data/stanford_online_products
output_dir: experiments/output_sop_dinov2_i2i
epochs: 20
batch_size: 128
learning_rate: 0.0001
loss_type: infonce
report_to: none
logging_steps: 10
save_steps: 1000
"""


def _write(tmp_path, text, name="factory.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_factory_config_maps_with_a_note(tmp_path, capsys):
    s = load_settings(_write(tmp_path, FACTORY_SOP))
    assert s.model.name == "facebook/dinov2-base"
    from vembed.models.loader import resolve_ref

    assert resolve_ref(s.model.name).name == "dinov2-base"  # the hub id of a registry model → its entry
    assert (s.train.method, s.train.loss, s.train.epochs, s.train.batch_size, s.train.lr) == (
        "lora",
        "infonce",
        20,
        128,
        1e-4,
    )
    assert str(s.data.train) == "data/stanford_online_products/train.jsonl"
    assert str(s.data.val) == "data/stanford_online_products/val.jsonl"
    assert str(s.data.image_root) == "data/stanford_online_products"
    assert str(s.train.output_dir) == "experiments/output_sop_dinov2_i2i"
    assert (s.train.log_every, s.train.checkpoint_every) == (10, 1000)
    # vembed-factory's own defaults for what the file leaves out, so it trains what it trained there
    assert (s.train.temperature, s.train.warmup_ratio, s.train.weight_decay) == (0.05, 0.1, 0.01)
    err = capsys.readouterr().err
    assert "vembed-factory config" in err and "model_name → model.name" in err
    assert "use_lora → train.method" in err and "ignored" in err and "report_to" in err


def test_every_mapped_target_is_a_real_setting(tmp_path):
    """Each factory key that maps to a setting produces settings that validate."""
    text = """\
model_name_or_path: my/own-model
projection_dim: 128
pooling_method: mean
torch_dtype: bfloat16
data_path: a.jsonl
val_data_path: b.jsonl
num_workers: 3
skip_invalid_records: true
epochs: 1
batch_size: 16
lr: 0.001
weight_decay: 0.02
warmup_ratio: 0.2
max_grad_norm: 0
gradient_accumulation_steps: 2
gradient_checkpointing: true
temperature: 0.07
seed: 5
use_lora: false
lora_r: 4
lora_alpha: 8
lora_dropout: 0.1
lora_target_modules: [query, value]
fp16: true
use_gradient_cache: true
gradient_cache_chunk_size: 8
loss_type: mrl
mrl_dims: [64, 32]
mrl_weights: [1.0, 1.0]
eval_steps: 50
scheduler_type: cosine
warmup_steps: 0
early_stopping_patience: -1
max_image_size: 224
"""
    s = load_settings(_write(tmp_path, text))
    assert s.model.name == "my/own-model"  # not in the registry: kept as a hub id
    assert (s.model.projection_dim, s.model.pooling, s.model.dtype) == (128, "mean", "bfloat16")
    assert (s.data.num_workers, s.data.skip_bad) == (3, True)
    assert s.train.method == "full" and s.train.lr == 1e-3 and s.train.grad_clip is None
    assert (s.train.grad_accum, s.train.grad_checkpointing, s.train.seed) == (2, True, 5)
    assert (s.train.lora.r, s.train.lora.alpha, s.train.lora.dropout) == (4, 8, 0.1)
    assert s.train.lora.targets == ["query", "value"]
    assert s.train.precision == "fp16" and s.train.grad_cache_chunk == 8
    assert s.train.loss == "infonce" and s.train.matryoshka_dims == [64, 32]
    assert (s.train.temperature, s.train.warmup_ratio, s.train.weight_decay) == (0.07, 0.2, 0.02)
    assert s.train.eval_every == 50


@pytest.mark.parametrize(
    "text,line,match",
    [
        ("model_name: x\nlearnig_rate: 0.1\n", 2, "learnig_rate: not a vembed-factory key.*'learning_rate'"),
        ("model_name: x\nretrieval_mode: t2t\n", 2, "vembed trains image-to-image"),
        ("model_name: x\nloss_type: cosent\n", 2, "'cosent' is not a loss vembed has"),
        ("model_name: x\nteacher_model_name: big\n", 2, "distillation"),
        ("text_model_name: bert\nimage_model_name: vit\n", 1, "text encoder"),
        ("model_name: x\ncolumn_mapping: {query: q}\n", 2, "fixed fields"),
        ("model_name: x\nuse_mrl: true\n", 2, "needs mrl_dims"),
        ("model_name: x\nuse_mrl: true\nmrl_dims: [8, 4]\nmrl_weights: [1, 0.5]\n", 4, "equally"),
        ("model_name: x\nscheduler_type: linear\n", 2, "cosine"),
        ("model_name: x\nwarmup_steps: 100\n", 2, "warmup_ratio"),
        ("model_name: x\nuse_lora: maybe\n", 2, "true or false"),
        ("model_name: x\nearly_stopping_patience: 3\n", 2, "not supported"),
        ("learning_rate: 0.1\nlr: 0.2\n", 2, "already set it"),
    ],
)
def test_factory_mistakes_are_one_error_naming_file_line_and_key(tmp_path, text, line, match):
    path = _write(tmp_path, text)
    with pytest.raises(VembedError, match=match) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert "\n" not in str(info.value)


def test_mapped_values_are_still_validated(tmp_path):
    with pytest.raises(VembedError, match="'train.batch_size' = -4"):
        load_settings(_write(tmp_path, "model_name: x\nbatch_size: -4\n"))


def test_temperature_default_only_for_contrastive_losses(tmp_path):
    out, _ = translate_factory_config({"model_name": "x", "loss_type": "triplet"})
    assert "temperature" not in out["train"] and out["train"]["warmup_ratio"] == 0.1


def test_detection():
    assert is_factory_config({"model_name": "x", "epochs": 2})
    assert not is_factory_config({"model": {"name": "x"}, "train": {"epochs": 2}})
    assert not is_factory_config({"modle": {"name": "x"}})  # a vembed recipe with a typo
    assert not is_factory_config({})
    assert {"model_name", "data_path", "use_lora", "loss_type", "retrieval_mode", "lora_r"} <= FACTORY_KEYS


def test_vembed_sections_and_factory_keys_do_not_mix(tmp_path):
    with pytest.raises(VembedError, match="unknown setting 'model_name'"):
        load_settings(_write(tmp_path, "model:\n  name: dinov2-small\nmodel_name: x\n"))


def test_cli_config_show_and_error(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["config", "show", str(_write(tmp_path, FACTORY_SOP)), "train.epochs=3"])
    assert ok.exit_code == 0, ok.output
    assert "dinov2-base" in ok.output and "epochs: 3" in ok.output
    bad = runner.invoke(
        app, ["config", "show", str(_write(tmp_path, "model_name: x\nbatchsize: 8\n", "b.yaml"))]
    )
    assert bad.exit_code == 2
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "b.yaml:2: batchsize" in lines[0] and "'batch_size'" in lines[0]
