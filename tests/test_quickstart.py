"""vembed quickstart, shrunken (60 digits per class, a 2-layer ViT) through the same code path."""

import json

import pytest
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.records import read_records
from vembed.errors import VembedError
from vembed.evaluation.run import evaluate_retrieval
from vembed.models.factory import create_embedder
from vembed.quickstart import QuickstartOptions, run_quickstart, write_digits


def _small(**changes) -> QuickstartOptions:
    options = QuickstartOptions(
        images_per_class=60,
        epochs=10,
        num_layers=2,
        batch_size=40,
        samples_per_class=4,
        show_progress=False,
    )
    for key, value in changes.items():
        setattr(options, key, value)
    return options


def test_quickstart_trains_and_recall_rises(tmp_path):
    result = run_quickstart(tmp_path / "qs", _small())
    before, after = result.before.metrics, result.after.metrics
    assert before["num_queries"] == after["num_queries"] > 0
    assert after["recall@1"] >= before["recall@1"] + 0.05, (before, after)  # measured: 0.52 → 0.67
    assert after["map@r"] > before["map@r"]

    # real data: 10 digit classes, stratified, test never used for training or validation
    splits = {n: read_records(result.data_dir / f"{n}.jsonl").records for n in ("train", "val", "test")}
    assert {r.label for r in splits["test"]} == {str(d) for d in range(10)}
    images = [{r.image.resolve() for r in recs} for recs in splits.values()]
    assert not (images[0] & images[2]) and not (images[1] & images[2]) and not (images[0] & images[1])
    assert sum(len(s) for s in splits.values()) == 600

    # the run is a normal run directory; final/ loads like any model
    assert (result.run_dir / "settings.yaml").is_file() and (result.run_dir / "metrics.jsonl").is_file()
    assert create_embedder(str(result.final_dir)).pooling == "mean"
    # the untrained model folder carries the quickstart's pooling: `--compare runs/quickstart/model`
    # (default settings) reproduces the "before" row
    bare = evaluate_retrieval(str(result.model_dir), result.data_dir / "test.jsonl", show_progress=False)
    assert bare.metrics["recall@1"] == before["recall@1"] and bare.metrics["map@r"] == before["map@r"]
    summary = json.loads(result.summary_path.read_text())
    assert summary["before"]["recall@1"] == before["recall@1"]
    assert summary["after"]["recall@1"] == after["recall@1"]
    assert summary["train"]["steps"] > 0 and summary["seconds"] > 0


def test_digits_are_real_pngs_by_class(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = write_digits(tmp_path / "images", images_per_class=3, px=32)
    files = sorted(folder.rglob("*.png"))
    assert len(files) == 30 and {f.parent.name for f in files} == {str(d) for d in range(10)}
    first = files[0]
    index = int(first.stem)
    digits = load_digits()
    assert str(digits.target[index]) == first.parent.name
    with Image.open(first) as img:
        assert img.size == (32, 32)
        # the picture is the scan, upscaled: its 4x-downsampled version correlates with the 8x8 original
        small = img.convert("L").resize((8, 8), Image.Resampling.BOX)
    import numpy as np

    corr = np.corrcoef(np.asarray(small, dtype=float).ravel(), digits.images[index].ravel())[0, 1]
    assert corr > 0.9


def test_out_must_be_new_or_a_previous_quickstart(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(VembedError, match="not written by vembed quickstart"):
        run_quickstart(other, _small())
    assert (other / "thesis.tex").read_text() == "precious"
    with pytest.raises(VembedError, match="at least 3"):
        run_quickstart(tmp_path / "qs", _small(images_per_class=2))


def test_cli_quickstart_reruns_in_place(tmp_path):
    runner = CliRunner()
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--epochs", "1", "--images-per-class", "12"]
    first = runner.invoke(app, args, terminal_width=200)
    assert first.exit_code == 0, first.output
    assert "R@1" in first.output and "random init" in first.output and "trained" in first.output
    second = runner.invoke(app, args, terminal_width=200)  # a re-run replaces the previous outputs
    assert second.exit_code == 0, second.output
    assert json.loads((out / "quickstart.json").read_text())["options"]["epochs"] == 1
