import json

import pytest
import torch
from conftest import make_image_dataset, save_tiny_model
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.records import read_records
from vembed.evaluation.options import retrieval_setup
from vembed.evaluation.retrieval import retrieval_metrics
from vembed.evaluation.run import evaluate_retrieval
from vembed.inference import embed_records
from vembed.models.factory import create_embedder
from vembed.settings import Settings

runner = CliRunner()


def test_eval_retrieval_writes_metrics_json(tiny_model, image_dataset, tmp_path):
    out = tmp_path / "m.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "retrieval",
            "--model",
            str(tiny_model),
            "--data",
            str(image_dataset),
            "--k",
            "1,3",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert {"recall@1", "recall@3", "map@r"} <= set(metrics)
    assert metrics["num_queries"] == 20 and metrics["protocol"] == "all-vs-all"
    assert 0 <= metrics["recall@1"] <= metrics["recall@3"] <= 1
    assert (tmp_path / "m.settings.yaml").is_file()  # resolved settings beside the output


def test_eval_matches_the_library_path(tiny_model, image_dataset):
    """The CLI's numbers are retrieval_metrics over embed_records: check against a direct computation."""
    settings = Settings()
    report = evaluate_retrieval(
        str(tiny_model), image_dataset, **retrieval_setup(settings), show_progress=False
    )
    records = read_records(image_dataset).images()
    emb = embed_records(create_embedder(str(tiny_model)), records, num_workers=0, show_progress=False)
    labels = [r.label for r in records]
    # brute force: full similarity matrix, self masked
    sim = emb.embeddings @ emb.embeddings.T
    sim.fill_diagonal_(-float("inf"))
    top1 = sim.argmax(dim=1)
    expected_r1 = sum(labels[int(j)] == labels[i] for i, j in enumerate(top1)) / len(labels)
    assert report.metrics["recall@1"] == pytest.approx(expected_r1)
    assert report.metrics == retrieval_metrics(emb.embeddings, labels, ks=settings.eval.k)


def test_compare_shows_deltas(tmp_path, image_dataset):
    a = save_tiny_model(tmp_path / "a", seed=0)
    b = save_tiny_model(tmp_path / "b", seed=3)
    out = tmp_path / "cmp.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "retrieval",
            "-m",
            str(a),
            "--compare",
            str(b),
            "-d",
            str(image_dataset),
            "--json",
            str(out),
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    other = data["compare"][0]
    assert other["model"] == str(b)
    assert other["delta"]["recall@1"] == pytest.approx(other["recall@1"] - data["recall@1"])


def test_query_gallery_protocol(tiny_model, tmp_path):
    make_image_dataset(tmp_path / "q", num_classes=3, per_class=2, seed=1)
    make_image_dataset(tmp_path / "g", num_classes=3, per_class=4, seed=2)
    report = evaluate_retrieval(
        str(tiny_model),
        tmp_path / "q/records.jsonl",
        gallery=tmp_path / "g/records.jsonl",
        show_progress=False,
    )
    assert report.protocol == "query/gallery" and report.metrics["num_queries"] == 6


def test_missing_image_is_one_line_error(tiny_model, image_dataset):
    lines = image_dataset.read_text().splitlines()
    lines[2] = json.dumps({"image": "images/nope.png", "label": 0})
    image_dataset.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["eval", "retrieval", "-m", str(tiny_model), "-d", str(image_dataset)])
    assert result.exit_code == 2
    assert "records.jsonl:3: image not found" in result.output
    skipped = runner.invoke(
        app, ["eval", "retrieval", "-m", str(tiny_model), "-d", str(image_dataset), "--skip-bad"]
    )
    assert skipped.exit_code == 0, skipped.output
    assert "skipped 1 bad record" in skipped.output


def test_corrupt_image_names_the_record_line(tiny_model, image_dataset):
    (image_dataset.parent / "images/class_1/img_0.png").write_bytes(b"")
    result = runner.invoke(app, ["eval", "retrieval", "-m", str(tiny_model), "-d", str(image_dataset)])
    assert result.exit_code == 2
    assert "records.jsonl:6" in result.output and "cannot decode image" in result.output


def test_unknown_model_and_missing_sop_split(tmp_path):
    result = runner.invoke(app, ["eval", "retrieval", "-m", "dinov2-smal", "-d", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and "dinov2-small" in result.output
    result = runner.invoke(app, ["eval", "sop", "-m", "dinov2-small", "--data", str(tmp_path)])
    assert result.exit_code == 2 and "vembed prepare sop" in result.output


def test_trained_like_embeddings_score_higher(tiny_model, image_dataset):
    """Sanity of the metric direction: label-aligned embeddings beat the random model."""
    records = read_records(image_dataset).images()
    labels = torch.tensor([r.label for r in records])
    perfect = torch.nn.functional.one_hot(labels, 4).float()
    assert retrieval_metrics(perfect, labels, ks=[1])["recall@1"] == 1.0
