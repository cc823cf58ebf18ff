import pytest
from typer.testing import CliRunner

from vembed.cli import app
from vembed.errors import VembedError
from vembed.settings import load_settings, parse_override, settings_to_yaml


def test_recipe_and_dotted_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: dinov2-base\ntrain:\n  lr: 0.001\n  batch_size: 64\n")
    s = load_settings(recipe, ["train.lr=3e-4", "eval.k=1,5", "train.lora.r=8"])
    assert s.model.name == "dinov2-base"
    assert s.train.lr == pytest.approx(3e-4)  # "3e-4" is a YAML string; pydantic coerces it
    assert s.train.batch_size == 64
    assert s.eval.k == [1, 5]
    assert s.train.lora.r == 8


def test_values_are_used_verbatim_and_win_over_overrides():
    s = load_settings(None, ["model.name=a"], {"model.name": "weird: name"})
    assert s.model.name == "weird: name"


def test_unknown_key_names_key_and_suggests_closest(tmp_path):
    with pytest.raises(VembedError, match=r"unknown setting 'train\.lrr' \(did you mean 'train\.lr'\?\)"):
        load_settings(None, ["train.lrr=1"])
    with pytest.raises(VembedError, match=r"unknown setting 'modle'.*did you mean 'model'"):
        load_settings(None, ["modle.name=x"])


def test_wrong_type_names_key_value_and_expectation(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  batch_size: lots\n")
    with pytest.raises(VembedError) as exc:
        load_settings(recipe)
    message = str(exc.value)
    assert str(recipe) in message and "train.batch_size" in message and "'lots'" in message
    assert "integer" in message


def test_invalid_yaml_names_file_and_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("train:\n  lr: [1,\n")
    with pytest.raises(VembedError, match=r"broken\.yaml:\d+: invalid YAML"):
        load_settings(recipe)


def test_missing_recipe_and_bad_override():
    with pytest.raises(VembedError, match="recipe not found"):
        load_settings("nope.yaml")
    with pytest.raises(VembedError, match="not key=value"):
        parse_override("train.lr")


def test_resolved_yaml_round_trips(tmp_path):
    s = load_settings(None, ["train.epochs=3", "model.pooling=gem"])
    path = tmp_path / "resolved.yaml"
    path.write_text(settings_to_yaml(s))
    assert load_settings(path) == s


def test_config_show_cli(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epochs: 5\n")
    result = CliRunner().invoke(app, ["config", "show", str(recipe), "train.lr=0.5"])
    assert result.exit_code == 0, result.output
    assert "epochs: 5" in result.output and "lr: 0.5" in result.output
    bad = CliRunner().invoke(app, ["config", "show", str(recipe), "train.epoch=5"])
    assert bad.exit_code == 2
    assert "did you mean 'train.epochs'" in bad.output


def test_train_augment_is_settings_and_still_takes_the_old_switch(tmp_path):
    from vembed.models.loader import load_spec as resolve_spec
    from vembed.training.data import train_transform

    spec = resolve_spec("dinov2-small")
    assert load_settings(None, ["train.augment=false"]).train.augment.enabled is False
    default = load_settings().train
    assert not default.augment.enabled and type(train_transform(spec, default)).__name__ == "EvalTransform"
    on = load_settings(None, ["train.augment=true"]).train
    assert on.augment.enabled and (on.augment.scale, on.augment.hflip) == (None, None)  # the task's defaults
    t = train_transform(spec, on)
    assert (t.scale, t.hflip) == ((0.9, 1.0), 0.0)
    custom = load_settings(None, ["train.augment.scale=0.8,1", "train.augment.hflip=0.5"]).train
    t = train_transform(spec, custom)  # keys given without the switch turn it on
    assert custom.augment.enabled and (t.scale, t.hflip) == ((0.8, 1.0), 0.5)
    assert load_settings(None, ["train.augment.scale=null"]).train.augment.enabled
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  augment: {scale: [0.35, 1.0], hflip: 0.5}\n")
    assert load_settings(recipe).train.augment.enabled
    with pytest.raises(VembedError, match=r"train.augment.scale.*0 < min <= max <= 1"):
        load_settings(None, ["train.augment.scale=0,1"])
    with pytest.raises(VembedError, match=r"unknown setting 'train.augment.flip'.*hflip"):
        load_settings(None, ["train.augment.flip=0"])


def test_a_dotted_augment_key_under_the_boolean_switch_keeps_the_switch(tmp_path):
    from vembed.models.loader import load_spec as resolve_spec
    from vembed.training.data import train_transform

    off_then_key = load_settings(None, ["train.augment=false", "train.augment.hflip=0.5"]).train
    assert (off_then_key.augment.enabled, off_then_key.augment.hflip) == (False, 0.5)
    assert type(train_transform(resolve_spec("dinov2-small"), off_then_key)).__name__ == "EvalTransform"
    key_then_off = load_settings(None, ["train.augment.hflip=0.5", "train.augment=false"]).train
    assert key_then_off.augment == off_then_key.augment
    on = load_settings(None, ["train.augment=true", "train.augment.hflip=0.5"]).train.augment
    assert (on.enabled, on.hflip) == (True, 0.5)

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  augment: false\n")
    from_file = load_settings(recipe, ["train.augment.hflip=0"]).train.augment
    assert (from_file.enabled, from_file.hflip) == (False, 0.0)
    recipe.write_text("train:\n  augment: {scale: [0.5, 1], hflip: 0.5}\n")
    switched = load_settings(recipe, ["train.augment=false"]).train.augment
    assert (switched.enabled, switched.scale, switched.hflip) == (False, (0.5, 1.0), 0.5)
