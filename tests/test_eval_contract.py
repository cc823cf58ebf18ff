"""Every `vembed eval` subcommand is its evaluator run through compare(): calling the evaluator directly
gives the numbers of the command's JSON; compare() loads each model once and ranks by the primary metric."""

import json

import pytest
from conftest import class_image, save_tiny_model
from typer.testing import CliRunner

from vembed.cli import app
from vembed.data.prepare import prepare_imagefolder
from vembed.evaluation.base import EmbedOptions, EvalResult, Evaluator, read_eval_records
from vembed.evaluation.compare import compare
from vembed.evaluation.fewshot import FewShotEvaluator, fewshot_sets, read_fewshot_sets
from vembed.evaluation.knn import KnnEvaluator
from vembed.evaluation.linear_probe import LinearProbeEvaluator
from vembed.evaluation.options import RetrievalOptions
from vembed.evaluation.run import RetrievalEvaluator
from vembed.models.factory import create_embedder

runner = CliRunner()
EMBED = EmbedOptions(num_workers=0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """5 classes × 6 generated images → train/val/test and seen/unseen k-shot files."""
    root = tmp_path_factory.mktemp("contract")
    for label in range(5):
        folder = root / "tree" / f"c{label}"
        folder.mkdir(parents=True)
        for i in range(6):
            class_image(label, i, 28, seed=3).save(folder / f"{i}.png")
    prepare_imagefolder(
        root / "tree", root / "data", holdout_ratio=0.4, shots=2, val_ratio=0.17, test_ratio=0.5
    )
    return root / "data"


def cli_json(tmp_path, *args) -> dict:
    out = tmp_path / "out.json"
    result = runner.invoke(app, ["eval", *map(str, args), "--json", str(out), "data.num_workers=0"])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_retrieval_evaluator_gives_the_cli_numbers_with_dims_and_compare(tiny_model, prepared, tmp_path):
    other = save_tiny_model(tmp_path / "other", seed=1)
    test = prepared / "test.jsonl"
    cli = cli_json(tmp_path, "retrieval", "-m", tiny_model, "-d", test, "--k", "1,2", "--dims", "8",
                   "--compare", other)  # fmt: skip
    evaluator = RetrievalEvaluator(
        read_eval_records(test), embed=EMBED, options=RetrievalOptions(ks=(1, 2), dims=(8,))
    )
    assert isinstance(evaluator, Evaluator) and evaluator.primary_metric == "map@r"
    assert evaluator.metrics == ["recall@1", "recall@2", "map@r"]
    for name, expected in ((tiny_model, cli), (other, cli["compare"][0])):
        result = evaluator(create_embedder(str(name)), show_progress=False)
        assert isinstance(result, EvalResult) and set(evaluator.metrics) <= set(result.metrics)
        assert {k: expected[k] for k in result.metrics} == result.metrics
        assert {str(d): m for d, m in result.details["report"].dims.items()} == expected["dims"]
    delta = cli["compare"][0]["delta"]
    assert delta["map@r"] == pytest.approx(cli["compare"][0]["map@r"] - cli["map@r"])
    # the same embeddings scored by score() (training validation's cached features)
    model = create_embedder(str(tiny_model))
    from vembed.inference import embed_records

    records = read_eval_records(test).images()
    emb = embed_records(model, records, num_workers=0, show_progress=False)
    scored = evaluator.score(emb.embeddings, [records[i].label for i in emb.indices])
    assert scored.metrics == {k: cli[k] for k in scored.metrics}


def test_fewshot_knn_and_probe_evaluators_give_the_cli_numbers(tiny_model, prepared, tmp_path):
    model = create_embedder(str(tiny_model))
    cli = cli_json(tmp_path, "fewshot", "-m", tiny_model, "--data", prepared, "--k", "1,2")
    sets = read_fewshot_sets(fewshot_sets(prepared))
    fewshot = FewShotEvaluator(sets, ks=[1, 2], embed=EMBED)
    result = fewshot(model, show_progress=False)
    assert fewshot.primary_metric == "seen/top1@1shot" and list(result.metrics) == fewshot.metrics
    for name, by_k in cli["results"].items():
        for k, score in by_k.items():
            assert result.metrics[f"{name}/top1@{k}shot"] == score["top1"]
            assert result.metrics[f"{name}/top5@{k}shot"] == score["top5"]

    train, val, test = (read_eval_records(prepared / f"{s}.jsonl") for s in ("train", "val", "test"))
    cli = cli_json(tmp_path, "knn", "-m", tiny_model, "--train", train.path, "--test", test.path, "--k", "3")
    knn = KnnEvaluator(train, test, k=3, embed=EMBED)(model, show_progress=False)
    assert knn.metrics == {"knn_top1": cli["top1"]} and knn.details["report"].per_class == cli["per_class"]

    cli = cli_json(tmp_path, "linear-probe", "-m", tiny_model, "--train", train.path, "--val", val.path,
                   "--test", test.path, "--no-cache")  # fmt: skip
    probe = LinearProbeEvaluator(train, val, test, embed=EMBED)(model, show_progress=False)
    assert probe.metrics == {"probe_top1": cli["top1"]} and probe.details["report"].score.c == cli["c"]


class Fixed:
    """An evaluator whose result is the model's number (a stand-in to test compare)."""

    name, primary_metric, metrics = "fixed", "loss", ["loss"]

    def __init__(self, greater_is_better):
        self.greater_is_better = greater_is_better

    def __call__(self, model, *, show_progress=True):
        return EvalResult({"loss": model}, "loss", self.greater_is_better)


def test_compare_loads_each_model_once_ranks_and_keeps_the_first_only_when_asked():
    loads = []

    def load(ref):
        loads.append(ref)
        return {"a": 0.5, "b": 0.25, "c": 0.75}[ref]

    lower = compare(["a", "b", "c"], Fixed(False), load=load, show_progress=False)
    assert loads == ["a", "b", "c"] and [s.name for s in lower.scored] == ["a", "b", "c"]
    assert lower.best.name == "b" and lower.first_model is None
    assert lower.delta(lower.scored[2]) == {"loss": 0.25}
    higher = compare(["a", "b", "c"], Fixed(True), load=load, keep_first=True)
    assert higher.best.name == "c" and higher.first_model == 0.5


def test_retrieval_evaluator_for_validation_codes_names_and_a_classifier():
    """Training validation's use: dense label codes, class names for the classifier's top-1/top-5."""
    import torch

    from vembed.evaluation.classify import classification_scores
    from vembed.evaluation.retrieval import retrieval_metrics
    from vembed.models.heads import ClassifierHead

    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
    codes = [i % 3 for i in range(30)]
    names = ["cat", "dog", "eel"]
    head = ClassifierHead(8, ["dog", "cat", "eel"])  # the head's own column order
    evaluator = RetrievalEvaluator(
        [None] * 30, codes, options=RetrievalOptions(ks=(1, 5)), classifier=lambda: head, class_names=names
    )
    assert evaluator.metrics == ["recall@1", "recall@5", "map@r", "top1", "top5"]
    result = evaluator.score(emb, codes, problems=["x.png: cannot decode"])
    expected = retrieval_metrics(emb, codes, ks=(1, 5))
    assert {k: result.metrics[k] for k in expected} == expected and result.metrics["num_bad_images"] == 1
    with torch.no_grad():
        probs = head.probabilities(emb)
    columns = [head.labels.index(names[c]) for c in codes]
    scores = classification_scores(probs, columns, head.labels)
    assert (result.metrics["top1"], result.metrics["top5"]) == (scores["top1"], scores["top5"])
