"""`vembed eval fewshot / knn / linear-probe`, the embedding cache and truncated widths, end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import class_image, save_tiny_model
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.prepare import prepare_imagefolder
from vembed.data.records import read_records
from vembed.evaluation import linear_probe
from vembed.evaluation.base import EmbedOptions, embed_labelled, read_eval_records
from vembed.evaluation.cache import EmbeddingCache
from vembed.evaluation.fewshot import FewShotEvaluator, fewshot_accuracy, fewshot_sets, read_fewshot_sets
from vembed.evaluation.linear_probe import LinearProbeEvaluator
from vembed.evaluation.options import retrieval_setup
from vembed.evaluation.run import evaluate_retrieval
from vembed.inference import embed_records
from vembed.models.factory import create_embedder
from vembed.settings import ModelSettings, Settings

runner = CliRunner()
SETTINGS = Settings.model_validate({"data": {"num_workers": 0}})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """6 classes × 6 generated images → seen/unseen k-shot files (2 classes held out, 2 shots)."""
    root = tmp_path_factory.mktemp("cls")
    for label in range(6):
        folder = root / "tree" / f"c{label}"
        folder.mkdir(parents=True)
        for i in range(6):
            class_image(label, i, 28).save(folder / f"{i}.png")
    prepare_imagefolder(
        root / "tree", root / "data", holdout_ratio=0.34, shots=2, val_ratio=0.17, test_ratio=0.5
    )
    return root / "data"


def _labels(path):
    return {r.label for r in read_records(path).records}


def test_fewshot_json_layout_compare_and_plot(tiny_model, prepared, tmp_path):
    other = save_tiny_model(tmp_path / "other", seed=1)
    out = tmp_path / "fs.json"
    args = ["eval", "fewshot", "--model", str(tiny_model), "--data", str(prepared), "--k", "1,2,3"]
    args += ["--compare", str(other), "--json", str(out), "--plot", str(tmp_path / "fs.png")]
    result = runner.invoke(app, [*args, "data.num_workers=0"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data) == {"model", "results", "compare"} and data["model"] == str(tiny_model)
    assert set(data["results"]) == {"seen", "unseen"}
    for by_k in data["results"].values():
        assert set(by_k) == {"1", "2", "3"}
        for score in by_k.values():
            assert set(score) == {"top1", "top5", "std", "queries"} and score["std"] is None
            assert 0 <= score["top1"] <= score["top5"] <= 1
    assert [set(c) for c in data["compare"]] == [{"model", "results"}] and data["compare"][0]["model"] == str(
        other
    )
    assert (tmp_path / "fs.png").stat().st_size > 0
    # k=3 exceeds the 2-shot support: said, counted, evaluated with what there is
    assert "k=3:" in result.output and "fewer than 3 support images" in result.output


def test_seen_and_unseen_are_class_disjoint(tiny_model, prepared):
    seen = _labels(prepared / "seen_support.jsonl") | _labels(prepared / "seen_query.jsonl")
    unseen = _labels(prepared / "unseen_support.jsonl") | _labels(prepared / "unseen_query.jsonl")
    assert seen and unseen and not seen & unseen
    sets = fewshot_sets(prepared)
    embedder = create_embedder(str(tiny_model))
    options = EmbedOptions(num_workers=0)
    records = read_fewshot_sets(sets)
    report = FewShotEvaluator(records, ks=[1, 2], embed=options)(embedder, show_progress=False)
    report = report.details["report"]
    # the unseen numbers are those of the unseen files alone: the seen classes never compete
    alone = FewShotEvaluator({"unseen": records["unseen"]}, ks=[1, 2], embed=options)(embedder)
    assert report.results["unseen"] == alone.details["report"].results["unseen"]
    s, q = (embed_labelled(embedder, read_eval_records(p)) for p in sets["seen"])
    assert report.results["seen"] == fewshot_accuracy(s, q, [1, 2])


def test_knn_and_linear_probe_cli(tiny_model, prepared, tmp_path):
    files = {name: str(prepared / f"{name}.jsonl") for name in ("train", "val", "test")}
    knn = tmp_path / "knn.json"
    result = runner.invoke(
        app,
        ["eval", "knn", "--model", str(tiny_model), "--train", files["train"], "--test", files["test"]]
        + ["--k", "3", "--json", str(knn), "data.num_workers=0"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(knn.read_text())
    assert 0 <= data["top1"] <= 1 and data["k"] == 3 and set(data["per_class"]) == _labels(files["test"])
    probe = tmp_path / "probe.json"
    result = runner.invoke(
        app,
        ["eval", "linear-probe", "--model", str(tiny_model), "--json", str(probe)]
        + [f"--{n}={p}" for n, p in files.items()]
        + ["--cache-dir", str(tmp_path / "cache"), "data.num_workers=0"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(probe.read_text())
    assert 0 <= data["top1"] <= 1 and data["c"] in linear_probe.C_VALUES
    assert data["cached"] == {"train": False, "val": False, "test": False}


def test_probe_cache_is_reused_and_invalidated(tiny_model, prepared, tmp_path, monkeypatch):
    files = [prepared / f"{name}.jsonl" for name in ("train", "val", "test")]
    cache = EmbeddingCache(tmp_path / "cache")
    loads = []

    def load(name):
        loads.append(name)
        return create_embedder(name, SETTINGS.model)

    def evaluate_linear_probe(model, *paths, load=load):
        splits = [read_eval_records(p) for p in paths]
        probe = LinearProbeEvaluator(
            *splits, embed=EmbedOptions(num_workers=0), cache=cache, model_settings=SETTINGS.model, load=load
        )
        return probe(model, show_progress=False).details["report"]

    first = evaluate_linear_probe(str(tiny_model), *files)
    assert not any(first.cached.values()) and len(list(cache.folder.iterdir())) == 3 and len(loads) == 1
    again = evaluate_linear_probe(str(tiny_model), *files)
    assert all(again.cached.values()) and again.score == first.score
    assert len(loads) == 1  # every split cached: the model was not loaded
    # the test file changes (one record fewer) → its entry is recomputed, the others still reused
    test = prepared / "test_minus_one.jsonl"  # beside the original: relative paths still resolve
    test.write_text("\n".join(files[2].read_text().splitlines()[:-1]) + "\n")
    changed = evaluate_linear_probe(str(tiny_model), files[0], files[1], test)
    assert len(loads) == 2
    assert changed.cached == {"train": True, "val": True, "test": False}
    assert changed.score.queries == first.score.queries - 1


def test_truncated_width_is_slice_then_renormalise(tiny_model, prepared, tmp_path):
    records = read_records(prepared / "test.jsonl").images()
    full = embed_records(create_embedder(str(tiny_model)), records, num_workers=0, show_progress=False)
    short = create_embedder(str(tiny_model), ModelSettings(truncate_dim=16))
    assert short.embed_dim == 16
    emb = embed_records(short, records, num_workers=0, show_progress=False).embeddings
    assert torch.allclose(emb, F.normalize(full.embeddings[:, :16], dim=-1), atol=1e-6)
    # --dims scores the same width as model.truncate_dim
    dims = evaluate_retrieval(
        str(tiny_model), prepared / "test.jsonl", **retrieval_setup(SETTINGS, dims=[16])
    )
    truncated = Settings.model_validate({"data": {"num_workers": 0}, "model": {"truncate_dim": 16}})
    direct = evaluate_retrieval(str(tiny_model), prepared / "test.jsonl", **retrieval_setup(truncated))
    assert dims.dims[16] == direct.metrics
    with pytest.raises(Exception, match="truncate_dim is 64"):
        create_embedder(str(tiny_model), ModelSettings(truncate_dim=64))


def test_truncated_export_store_and_search(tiny_model, prepared, tmp_path):
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(tiny_model), "--out", str(out), "--truncate-dim", "8"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "vembed.json").read_text())["truncate_dim"] == 8
    assert "feats[:, :8]" in (out / "README.md").read_text()
    assert create_embedder(str(out)).embed_dim == 8
    store = tmp_path / "store"
    result = runner.invoke(
        app,
        ["embed", str(prepared / "test.jsonl"), "model.truncate_dim=8", "--model", str(tiny_model)]
        + ["--out", str(store), "--quiet", "--num-workers", "0"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((store / "meta.json").read_text())["dim"] == 8
    query = str(read_records(prepared / "test.jsonl").records[0].image)
    result = runner.invoke(app, ["search", str(store), query, "--k", "2", "--jsonl"])
    assert result.exit_code == 0, result.output


def test_fewshot_bad_inputs_are_one_line(tiny_model, prepared, tmp_path):
    result = runner.invoke(app, ["eval", "fewshot", "--model", str(tiny_model), "--data", str(tmp_path)])
    assert result.exit_code == 2 and "seen_support.jsonl" in result.output
    result = runner.invoke(app, ["eval", "fewshot", "--support", str(prepared / "seen_support.jsonl")])
    assert result.exit_code == 2 and "give both" in result.output
    # queries of classes with no support: named, left out, the rest evaluated
    result = runner.invoke(
        app,
        ["eval", "fewshot", "--model", str(tiny_model), "--support", str(prepared / "seen_support.jsonl")]
        + ["--query", str(prepared / "unseen_query.jsonl"), "data.num_workers=0"],
    )
    assert result.exit_code == 2 and "unseen_query.jsonl" in result.output and "absent from" in result.output
    result = runner.invoke(app, ["eval", "retrieval", "--model", str(tiny_model), "--dims", "16,x"])
    assert result.exit_code == 2 and "'x' is not an integer" in result.output


def test_help_lists_commands_in_the_order_they_are_used():
    result = runner.invoke(app, ["--help"])
    order = [
        line.split()[1] for line in result.output.splitlines() if line.startswith("│ ") and line[2] != " "
    ]
    order = [name for name in order if not name.startswith("-")]
    assert order[:7] == ["prepare", "mine", "train", "eval", "export", "embed", "search"]
    assert order.index("index") > order.index("search") and order[-1] in ("models", "config")
