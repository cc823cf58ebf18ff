"""``train.task=rerank`` end to end: training, calibration, the folder in a fresh process, export,
``vembed eval retrieval --rerank`` and ``vembed search --rerank``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import save_tiny_model
from tests.training_data import make_nuisance_dataset, tiny_settings
from vembed.errors import VembedError
from vembed.models.factory import ModelOptions, create_embedder, save_model
from vembed.models.pairwise import PairwiseHead, PairwiseModel
from vembed.rerank import load_reranker
from vembed.training.loop import train

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rerank")
    return {
        "root": root,
        "model": save_tiny_model(root / "tiny"),
        "train": make_nuisance_dataset(root / "train", num_classes=8, per_class=8),
        "val": make_nuisance_dataset(root / "val", num_classes=8, per_class=6, seed=1),
    }


@pytest.fixture(scope="module")
def trained(data) -> dict:
    settings = tiny_settings(
        data["model"], data["train"], data["root"] / "run", "train.task=rerank",
        f"train.rerank_from={data['model']}", "train.method=full", "train.epochs=4", "train.lr=3e-4",
        "train.batch_size=16", val=data["val"],
    )  # fmt: skip
    result = train(settings, show_progress=False)
    return {"result": result, "final": result.final_dir}


def hand_reranker(model: Path, out: Path, weight: float, top_n: int = 3) -> Path:
    """A re-ranker with an untrained (random) pairwise head and a given blend weight."""
    torch.manual_seed(0)
    embedder = create_embedder(str(model), ModelOptions(device="cpu", dtype="float32"))
    head = PairwiseHead(embedder.feature_dim, blend_weight=weight, top_n=top_n)
    save_model(PairwiseModel.from_embedder(embedder, head), out, head=head)
    return out


def test_training_raises_pair_accuracy_and_never_loses_recall(trained):
    history = trained["result"].history
    assert len(history) == 5
    for row in history:
        assert row["recall@1"] >= row["embedding_recall@1"]
        assert 0 <= row["blend_weight"] <= 1
        assert row["blend_weight"] == 0 or row["recall@1"] > row["embedding_recall@1"]
    assert history[-1]["pair_accuracy"] > history[0]["pair_accuracy"] + 0.1


def test_final_folder_reloads_in_a_fresh_process(trained):
    final = trained["final"]
    saved = json.loads((final / "vembed.json").read_text())
    head = saved["task_head"]
    assert head["kind"] == "pairwise" and head["top_n"] == 5
    rerank = saved["training"]["rerank"]
    assert rerank["blend_weight"] == head["blend_weight"]
    assert rerank["validation"]["recall@1"] >= rerank["validation"]["embedding_recall@1"]
    assert rerank["recall@1_by_weight"]["0"] == rerank["validation"]["embedding_recall@1"]
    code = (
        "import sys; from vembed.rerank import load_reranker; r = load_reranker(sys.argv[1], device='cpu'); "
        "print(r.weight, r.head.top_n, r.head.rerank_from)"
    )
    out = run(sys.executable, "-c", code, str(final)).stdout.split()
    assert out[:2] == [str(head["blend_weight"]), "5"]


def test_eval_rerank_json_keys_and_the_weight_it_was_calibrated_with(trained, data, tmp_path):
    final = trained["final"]
    out = tmp_path / "eval.json"
    run(
        "vembed", "eval", "retrieval", "--model", str(data["model"]), "--data", str(data["val"]),
        "--rerank", str(final), "--top-n", "5", "--json", str(out), "data.num_workers=0", "eval.k=1,5,10",
    )  # fmt: skip
    report = json.loads(out.read_text())
    before = report["before_rerank"]
    assert {"recall@1", "recall@5", "recall@10", "map@r"} <= set(before)
    assert report["rerank"] == {
        "model": str(final),
        "top_n": 5,
        "blend_weight": report["rerank"]["blend_weight"],
    }
    assert report["recall@10"] == before["recall@10"]  # past the top 5 nothing moves... the set in it neither
    assert report["recall@5"] == before["recall@5"]
    saved = json.loads((final / "vembed.json").read_text())["training"]["rerank"]["validation"]
    assert before["recall@1"] == pytest.approx(saved["embedding_recall@1"], abs=1e-6)
    assert report["recall@1"] == pytest.approx(saved["recall@1"], abs=1e-6)  # same set, same weight
    assert report["recall@1"] >= before["recall@1"]


def test_a_weight_zero_reranker_changes_nothing(data, tmp_path):
    reranker = hand_reranker(data["model"], tmp_path / "zero", 0.0)
    out = tmp_path / "eval.json"
    run(
        "vembed", "eval", "retrieval", "--model", str(data["model"]), "--data", str(data["val"]),
        "--rerank", str(reranker), "--json", str(out), "data.num_workers=0", "eval.k=1,2,5",
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert {k: report[k] for k in report["before_rerank"]} == report["before_rerank"]


def test_a_random_reranker_at_weight_one_changes_only_the_top_n(data, tmp_path):
    reranker = hand_reranker(data["model"], tmp_path / "one", 1.0, top_n=3)
    out = tmp_path / "eval.json"
    run(
        "vembed", "eval", "retrieval", "--model", str(data["model"]), "--data", str(data["val"]),
        "--rerank", str(reranker), "--json", str(out), "data.num_workers=0", "eval.k=1,3,4,10",
    )  # fmt: skip
    report = json.loads(out.read_text())
    before = report["before_rerank"]
    assert report["recall@1"] != before["recall@1"]  # a random MLP reorders the top 3
    assert report["recall@3"] == before["recall@3"] and report["recall@10"] == before["recall@10"]


def test_search_rerank_reorders_only_the_top_n(data, tmp_path):
    store = tmp_path / "store"
    run("vembed", "embed", str(data["val"]), "--model", str(data["model"]), "--out", str(store), "-q",
        "data.num_workers=0")  # fmt: skip
    queries = sorted((data["root"] / "val" / "images").rglob("*.png"))[:6]
    args = ["vembed", "search", str(store), *map(str, queries), "--k", "8", "--jsonl", "data.num_workers=0"]

    def rows(*extra: str) -> list[dict]:
        return [json.loads(line) for line in run(*args, *extra).stdout.splitlines()]

    plain = rows()
    one = rows("--rerank", str(hand_reranker(data["model"], tmp_path / "one", 1.0)), "--top-n", "4")
    zero = rows("--rerank", str(hand_reranker(data["model"], tmp_path / "zero", 0.0)), "--top-n", "4")
    assert [(r["query"], r["rank"], r["path"], r["score"]) for r in zero] == [
        (r["query"], r["rank"], r["path"], r["score"]) for r in plain
    ]
    moved = 0
    for query in map(str, queries):
        before = [r for r in plain if r["query"] == query]
        after = [r for r in one if r["query"] == query]
        assert [r["rank"] for r in after] == list(range(1, 9))
        assert after[4:] == before[4:]  # ranks 5..8 untouched (no rerank_score)
        assert sorted(r["path"] for r in after[:4]) == sorted(r["path"] for r in before[:4])
        scores = [r["rerank_score"] for r in after[:4]]
        assert scores == sorted(scores, reverse=True)
        moved += [r["path"] for r in after[:4]] != [r["path"] for r in before[:4]]
    assert moved > 0


def test_search_rerank_keeps_a_hit_whose_image_is_gone(data, tmp_path):
    import shutil

    images = tmp_path / "imgs"
    shutil.copytree(data["root"] / "val" / "images", images)
    store = tmp_path / "store"
    run("vembed", "embed", str(images), "--model", str(data["model"]), "--out", str(store), "-q",
        "data.num_workers=0")  # fmt: skip
    query = images / "c0" / "0.png"
    first = json.loads(
        run("vembed", "search", str(store), str(query), "--k", "3", "--jsonl").stdout.splitlines()[1]
    )
    Path(first["path"]).unlink()
    reranker = hand_reranker(data["model"], tmp_path / "one", 1.0)
    done = run("vembed", "search", str(store), str(query), "--k", "3", "--jsonl", "--rerank", str(reranker))
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    gone = next(r for r in rows if r["path"] == first["path"])
    assert gone["rerank_score"] == gone["score"]  # p unknown: its embedding similarity
    assert "--rerank" in done.stderr and Path(first["path"]).name in done.stderr


def test_rerank_settings_mistakes_are_one_line(data, tmp_path):
    from vembed.training.preflight import check_settings

    base = [data["model"], data["train"], tmp_path / "run", "train.task=rerank"]
    with pytest.raises(VembedError, match="needs train.rerank_from"):
        check_settings(tiny_settings(*base, val=data["val"]))
    with pytest.raises(VembedError, match="needs data.val"):
        check_settings(tiny_settings(*base, f"train.rerank_from={data['model']}"))
    with pytest.raises(VembedError, match="trains with bce"):
        check_settings(
            tiny_settings(*base, f"train.rerank_from={data['model']}", "train.loss=triplet", val=data["val"])
        )
    with pytest.raises(VembedError, match="not a re-ranker"):
        load_reranker(data["model"])


def test_export_of_a_reranker_reloads_and_its_card_gives_the_same_probability(trained, tmp_path):
    out = tmp_path / "export"
    run("vembed", "export", str(trained["final"]), "--out", str(out))
    reranker = load_reranker(out, device="cpu", dtype="float32")
    assert reranker.weight == load_reranker(trained["final"], device="cpu").weight
    from PIL import Image

    from tests.training_data import nuisance_image

    nuisance_image(0, 1).save(tmp_path / "a.jpg")
    nuisance_image(0, 2).save(tmp_path / "b.jpg")
    card = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace('"PATH"', repr(str(out)))
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(code, scope)  # noqa: S102 - the card's own lines
    finally:
        os.chdir(cwd)
    from vembed.data.records import ImageRecord
    from vembed.rerank import pair_probabilities

    records = [ImageRecord(tmp_path / "a.jpg"), ImageRecord(tmp_path / "b.jpg")]
    ours, _ = pair_probabilities(reranker.model, records, [(0, 1)], num_workers=0)
    assert Image.open(tmp_path / "a.jpg").size == (28, 28)
    assert float(scope["p_same"][0]) == pytest.approx(float(ours[0]), abs=1e-4)
