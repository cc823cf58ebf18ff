"""Image–text commands on a fine-tuned tiny CLIP: eval image-text, eval zeroshot, embed --text, search --text."""

from __future__ import annotations

import json

import pytest
from dual_helpers import captioned_digits, save_tiny_dual, train_by_hand
from typer.testing import CliRunner

from vembed.cli import app
from vembed.settings import load_settings

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("it")
    base = save_tiny_dual(root / "base", "clip")
    train, held = captioned_digits(root / "data")
    settings = load_settings(
        None,
        [
            f"model.name={base}",
            f"data.train={train}",
            "train.task=image_text",
            "train.method=full",
            "train.batch_size=64",
            "train.lr=1e-3",
            "data.num_workers=0",
            f"train.output_dir={root / 'run'}",
        ],
    )
    final = train_by_hand(settings, epochs=8)
    return {"base": base, "final": final, "held": held, "train": train, "root": root}


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_eval_image_text_json_keys_and_fine_tuning_gain(trained, tmp_path):
    out = tmp_path / "it.json"
    _run(
        "eval",
        "image-text",
        "--model",
        trained["final"],
        "--data",
        trained["held"],
        "--compare",
        trained["base"],
        "--json",
        out,
        "data.num_workers=0",
    )
    report = json.loads(out.read_text())
    for key in (
        "t2i_recall@1",
        "t2i_recall@5",
        "t2i_recall@10",
        "i2t_recall@1",
        "i2t_recall@5",
        "i2t_recall@10",
        "rsum",
    ):
        assert 0 <= report[key] <= (600 if key == "rsum" else 1)
    base = report["compare"][0]
    assert report["t2i_recall@1"] >= base["t2i_recall@1"] + 0.2  # 30 images: chance is 1/30
    assert report["rsum"] > base["rsum"] + 100
    assert base["delta"]["t2i_recall@1"] == pytest.approx(base["t2i_recall@1"] - report["t2i_recall@1"])


def test_eval_zeroshot_classifies_digits_by_their_number_word(trained, tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("# one prompt per ink colour\na red {label}\na green {label}\na blue {}\n")
    out, plot = tmp_path / "zs.json", tmp_path / "confusion.png"
    _run(
        "eval",
        "zeroshot",
        "--model",
        trained["final"],
        "--data",
        trained["held"],
        "--templates",
        templates,
        "--compare",
        trained["base"],
        "--json",
        out,
        "--plot",
        plot,
        "data.num_workers=0",
    )
    report = json.loads(out.read_text())
    assert report["templates"] == 3 and len(report["confusion"]["labels"]) == 10
    assert report["top1"] > report["compare"][0]["top1"]
    assert report["top1"] >= 0.2 and report["top5"] >= report["top1"]
    assert plot.stat().st_size > 1000


def test_search_text_finds_the_described_image(trained, tmp_path):
    store = tmp_path / "store"
    _run(
        "embed", trained["held"], "--model", trained["final"], "--out", store, "--quiet", "data.num_workers=0"
    )
    assert json.loads((store / "meta.json").read_text())["model"]["text_tower"] is True
    result = _run(
        "search",
        store,
        "--text",
        "a red seven",
        "--text",
        "a picture of a blue two",
        "--k",
        "3",
        "--jsonl",
        "--grid",
        tmp_path / "grid.png",
    )
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    captions = {
        json.loads(line)["image"]: json.loads(line)["captions"][0]
        for line in trained["held"].read_text().splitlines()
    }
    for query, wanted in (("a red seven", "a red seven"), ("a picture of a blue two", "a blue two")):
        top = [r for r in rows if r["query"] == query and r["rank"] == 1][0]
        assert captions[top["path"].split("/data/")[-1]] == wanted, top
    assert (tmp_path / "grid.png").is_file()


def test_text_queries_from_a_file_and_stdin(trained, tmp_path):
    store = tmp_path / "store"
    _run(
        "embed", trained["held"], "--model", trained["final"], "--out", store, "--quiet", "data.num_workers=0"
    )
    queries = tmp_path / "q.txt"
    queries.write_text("a green four\n\na red zero\n")
    rows = [
        json.loads(x)
        for x in _run("search", store, "--text-file", queries, "--jsonl").stdout.splitlines()
        if x.startswith("{")
    ]
    assert {r["query"] for r in rows} == {"a green four", "a red zero"}
    stdin = runner.invoke(
        app, ["search", str(store), "--text-file", "-", "--jsonl", "--k", "1"], input="a blue one\n"
    )
    assert stdin.exit_code == 0 and '"query": "a blue one"' in stdin.stdout


def test_embed_text_writes_json_lines(trained, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("a red one\nthe digit two written in blue ink\n")
    result = _run("embed", "--text", texts, "--model", trained["final"], "--jsonl")
    rows = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert [r["text"] for r in rows] == ["a red one", "the digit two written in blue ink"]
    assert len(rows[0]["embedding"]) == 24
    assert abs(sum(v * v for v in rows[0]["embedding"]) - 1) < 1e-4


def test_a_store_without_a_text_tower_refuses_text_queries_in_one_line(trained, tmp_path):
    store = tmp_path / "vision"
    _run(
        "embed", trained["held"], "--model", trained["base"], "--out", store, "--quiet", "data.num_workers=0"
    )
    result = runner.invoke(app, ["search", str(store), "--text", "a red seven"])
    assert result.exit_code != 0
    assert "has no text tower" in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 3


def test_embed_text_needs_a_dual_encoder(tmp_path):
    from conftest import save_tiny_model

    texts = tmp_path / "t.txt"
    texts.write_text("a red one\n")
    model = save_tiny_model(tmp_path / "dino")
    result = runner.invoke(app, ["embed", "--text", str(texts), "--model", str(model), "--jsonl"])
    assert result.exit_code != 0 and "without a text tower" in result.output


def test_train_summary_prints_rsum_in_percent_points_like_eval():
    """rsum is already a sum of percents (0-600): the training table showed it × 100 (37222.22)."""
    from types import SimpleNamespace

    from rich.console import Console

    from vembed.cli.eval_image_text import _delta
    from vembed.cli.train import _summary

    row = {"step": 0, "t2i_recall@1": 0.2222, "rsum": 372.22, "mean_recall@1": 0.1944}
    result = SimpleNamespace(
        run_dir="runs/x", history=[row], best=row, selected="best", steps=2, images_per_second=1.0,
        seconds=1.0, final_dir="runs/x/final",
    )  # fmt: skip
    console = Console(width=200, record=True)
    console.print(_summary(result, ["t2i_recall@1", "rsum", "mean_recall@1"]))
    text = console.export_text()
    assert "372.22" in text and "37222" not in text and "22.22" in text and "19.44" in text
    assert _delta("rsum", 372.22, 350.0).startswith("372.22 [green](+22.22)")
    assert _delta("top1", 0.5, 0.25).startswith("50.00 [green](+25.00)")
