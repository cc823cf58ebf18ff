"""Classifier heads: `vembed classify`, `vembed eval classify`, export round trip, bad input."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import make_image_dataset
from typer.testing import CliRunner

from vembed.classify import load_classifier_model
from vembed.cli import app
from vembed.data.records import read_records
from vembed.evaluation.base import EmbedOptions, read_eval_records
from vembed.evaluation.classify import ClassifyEvaluator
from vembed.export import export_model
from vembed.inference import embed_records
from vembed.models.factory import create_embedder, save_model
from vembed.models.heads import ClassifierHead, require_classifier
from vembed.settings import Settings

runner = CliRunner()
SETTINGS = Settings.model_validate({"data": {"num_workers": 0}})


def evaluate_classify(model, data):
    """The ClassifyEvaluator's report of ``model`` (a classifier run or export) on ``data``."""
    evaluator = ClassifyEvaluator(read_eval_records(data), embed=EmbedOptions(num_workers=0))
    return evaluator(load_classifier_model(model, SETTINGS), show_progress=False).details["report"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 classes × 5 images, labels are class names ("c0" ...)."""
    path = make_image_dataset(tmp_path_factory.mktemp("clsdata"), num_classes=4, per_class=5)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    named = path.parent / "named.jsonl"
    named.write_text("".join(json.dumps({**r, "label": f"c{r['label']}"}) + "\n" for r in lines))
    return named


@pytest.fixture(scope="module")
def head_model(tiny_model, data, tmp_path_factory):
    """The tiny model with a classifier whose weights are the class mean embeddings (a usable head)."""
    embedder = create_embedder(str(tiny_model))
    records = read_records(data).images()
    emb = embed_records(embedder, records, num_workers=0, show_progress=False).embeddings
    labels = sorted({r.label for r in records})
    head = ClassifierHead(embedder.embed_dim, labels)
    with torch.no_grad():
        means = torch.stack([emb[[i for i, r in enumerate(records) if r.label == c]].mean(0) for c in labels])
        head.classifier.weight.copy_(10 * F.normalize(means, dim=-1))
        head.classifier.bias.zero_()
    out = tmp_path_factory.mktemp("headmodel") / "final"
    save_model(embedder, out, head=head)
    return out


def test_classify_agrees_with_eval_classify(head_model, data, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "classify", "--model", str(head_model), "--data", str(data), "--json", str(out)]
    result = runner.invoke(app, [*args, "--plot", str(tmp_path / "cm.png"), "data.num_workers=0"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert 0 <= report["top1"] <= report["top5"] <= 1 and report["queries"] == 20
    assert set(report["per_class"]["c0"]) == {"precision", "recall", "f1", "support"}
    assert report["confusion"]["labels"] == ["c0", "c1", "c2", "c3"]
    assert (tmp_path / "cm.png").stat().st_size > 0
    result = runner.invoke(
        app,
        [
            "classify",
            str(head_model),
            str(data),
            "--jsonl",
            "--top",
            "2",
            "--quiet",
            "--grid",
            str(tmp_path / "g.png"),
        ]
        + ["data.num_workers=0"],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert (
        len(lines) == 20 and {"image", "label", "probability"} <= set(lines[0]) and len(lines[0]["top"]) == 2
    )
    truth = {str(r.image): r.label for r in read_records(data).images()}
    correct = sum(line["label"] == truth[line["image"]] for line in lines)
    assert correct / 20 == pytest.approx(report["top1"])
    confusion = report["confusion"]["matrix"]
    assert sum(confusion[i][i] for i in range(4)) == correct
    assert (tmp_path / "g.png").stat().st_size > 0
    # the ClassifyEvaluator called directly gives the numbers of `eval classify --json`
    direct = evaluate_classify(str(head_model), data)
    assert (direct.top1, direct.top5, direct.per_class) == (
        report["top1"],
        report["top5"],
        report["per_class"],
    )
    assert direct.confusion == confusion


def test_export_round_trips_the_head(head_model, data, tmp_path):
    export_model(head_model, tmp_path / "export")
    a, b = require_classifier(head_model), require_classifier(tmp_path / "export")
    assert a.labels == b.labels == ["c0", "c1", "c2", "c3"]
    assert torch.equal(a.classifier.weight, b.classifier.weight) and torch.equal(
        a.classifier.bias, b.classifier.bias
    )
    card = (tmp_path / "export" / "README.md").read_text()
    assert "vembed classify" in card and "c0" in card
    # the card's classifier lines give the head's probabilities for the card's embeddings (that those
    # embeddings are vembed's is test_export's job)
    images = [str(r.image) for r in read_records(data).images()[:3]]
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.replace('"PATH"', repr(str(tmp_path / "export"))).replace('["a.jpg", "b.jpg"]', repr(images))
    scope: dict = {}
    exec(code, scope)
    assert (scope["probs"] - b.probabilities(scope["emb"])).abs().max() < 1e-6
    assert scope["predicted"] == [b.labels[i] for i in b.probabilities(scope["emb"]).argmax(dim=1)]
    before = evaluate_classify(str(head_model), data)
    after = evaluate_classify(str(tmp_path / "export"), data)
    assert before.confusion == after.confusion


def test_model_without_a_head_and_foreign_labels_are_one_line(tiny_model, head_model, data, tmp_path):
    for args in (
        ["eval", "classify", "--model", str(tiny_model), "--data", str(data)],
        ["classify", str(tiny_model), str(data)],
    ):
        result = runner.invoke(app, args)
        assert (
            result.exit_code == 2
            and "has no classifier head" in result.output
            and "Traceback" not in result.output
        )
    numbers = data.parent / "records.jsonl"  # labels 0..3, the head knows c0..c3
    result = runner.invoke(app, ["eval", "classify", "--model", str(head_model), "--data", str(numbers)])
    assert result.exit_code == 2 and "label names differ between the run and the data" in result.output
    assert "records.jsonl" in result.output
    mixed = tmp_path / "mixed.jsonl"  # one class the head does not know: warned, left out
    lines = data.read_text().splitlines()
    mixed.write_text("\n".join(lines + [lines[0].replace('"c0"', '"zebra"')]) + "\n")
    mixed_images = tmp_path / "images"
    mixed_images.symlink_to(data.parent / "images")
    result = runner.invoke(
        app,
        [
            "eval",
            "classify",
            "--model",
            str(head_model),
            "--data",
            str(mixed),
            "--json",
            str(tmp_path / "m.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "zebra" in result.output and "left out" in result.output
    assert json.loads((tmp_path / "m.json").read_text())["num_skipped"] == 1


def test_a_ce_run_keeps_its_classifier_and_validates_top1(tiny_model, tmp_path):
    """method=frozen + loss=ce: validation rows carry top1 beside Recall@K, select_metric=top1 works,
    and final/ classifies with the class names of the training data."""
    from training_data import make_nuisance_dataset, one_thread, tiny_settings

    from vembed.settings import TrainSettings
    from vembed.training import train

    # model selection by top1 needs train.select_metric (the training-core refactor)
    select = ["train.select_metric=top1"] if "select_metric" in TrainSettings.model_fields else []

    train_file = make_nuisance_dataset(tmp_path / "train", num_classes=4, per_class=6, seed=0)
    val_file = make_nuisance_dataset(tmp_path / "val", num_classes=4, per_class=3, seed=1)
    settings = tiny_settings(
        tiny_model,
        train_file,
        tmp_path / "run",
        "train.method=frozen",
        "train.loss=ce",
        "train.epochs=3",
        *select,
        val=val_file,
    )
    with one_thread():
        result = train(settings, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if r.get("kind") == "val"]
    assert val_rows and all({"top1", "top5", "recall@1"} <= set(r) for r in val_rows)
    assert max(r["top1"] for r in val_rows[1:]) > val_rows[0]["top1"]  # the (standardised) head learns
    head = require_classifier(result.final_dir)
    assert sorted(map(str, head.labels)) == sorted({str(r.label) for r in read_records(train_file).images()})
    report = evaluate_classify(str(result.final_dir), val_file)
    saved = json.loads((result.final_dir / "vembed.json").read_text())["training"]["metrics"]
    assert report.top1 == pytest.approx(saved["top1"])  # validation and eval classify agree
