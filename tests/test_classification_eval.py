"""k-shot prototypes, weighted kNN and the linear probe, checked against hand-computed results."""

import math

import numpy as np
import pytest
import torch

from vembed.errors import VembedError
from vembed.evaluation.base import LabelledEmbeddings
from vembed.evaluation.fewshot import fewshot_accuracy, prototype_accuracy
from vembed.evaluation.knn import knn_accuracy, knn_predict
from vembed.evaluation.linear_probe import fit_linear_probe


def _angles(degrees, labels, source="f.jsonl"):
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    emb = torch.stack([torch.cos(rad), torch.sin(rad)], dim=1).float()
    return LabelledEmbeddings(emb, list(labels), source)


# six classes on the unit circle: class c's first support image at 60°·c
SUPPORT = _angles([0, 60, 120, 180, 240, 300, 90], [0, 1, 2, 3, 4, 5, 0], "support.jsonl")


def test_prototype_accuracy_by_hand():
    # label 0 at 5°: nearest prototype 0 (top-1 hit)
    # label 1 at 175°: ranking 3, 2, 4, 1, 5, 0 → top-1 miss, top-5 hit
    # label 0 at 180°: class 0 is the farthest prototype → top-1 and top-5 miss
    # label 5 at 290°: nearest 300° → hit
    query = _angles([5, 175, 180, 290], [0, 1, 0, 5], "query.jsonl")
    score = prototype_accuracy(SUPPORT, query, k=1)
    assert (score.top1, score.top5, score.std, score.queries) == (0.5, 0.75, None, 4)
    # k=2: class 0's prototype is the mean of 0° and 90° → 45°; the query at 5° is still closest to it,
    # but a label-0 query at 340° now goes to class 5 (300°: 40° away) rather than 0 (45°: 65° away)
    query2 = _angles([5, 340], [0, 0])
    assert prototype_accuracy(SUPPORT, query2, k=2).top1 == 0.5
    assert prototype_accuracy(SUPPORT, query2, k=1).top1 == 1.0  # first support only: 0° wins both


def test_episodes_mean_and_std_by_hand():
    # class A: a good support image (0°) and a bad one (150°); class B: one image at 90°.
    support = _angles([0, 150, 90], ["A", "A", "B"])
    query = _angles([10], ["A"])
    # k=1: an episode drawing the 0° image classifies the query right (1), the 150° one wrong (0)
    score = prototype_accuracy(support, query, k=1, episodes=40, seed=3)
    assert 0 < score.top1 < 1
    p = score.top1
    assert score.std == pytest.approx(math.sqrt(p * (1 - p)))  # population std of 0/1 outcomes
    assert prototype_accuracy(support, query, k=1, episodes=40, seed=3) == score  # seeded
    # k=2 draws every A image each time: every episode is the default protocol's result, std 0
    full = prototype_accuracy(support, query, k=2, episodes=5)
    assert full.std == 0.0 and full.top1 == prototype_accuracy(support, query, k=2).top1 == 1.0


def test_fewshot_bad_input_warns_and_counts(capsys):
    query = _angles([5, 50, 100], [0, 1, 9], "query.jsonl")  # class 9 has no support
    scores = fewshot_accuracy(SUPPORT, query, [1, 3])
    err = capsys.readouterr().err
    assert "query.jsonl" in err and "1 queries of 1 class(es) absent from support.jsonl (9)" in err
    assert "k=3: 6 of 6 classes have fewer than 3 support images" in err
    assert scores[1].queries == 2 and scores[1].top1 == 1.0
    with pytest.raises(VembedError, match="no queries has a class"):
        fewshot_accuracy(SUPPORT, _angles([5], [7], "q.jsonl"), [1])


def _unit16(first: float) -> list[float]:
    """A 16-d unit vector with first component ``first`` (0.25, 0.5 or 1; exactly representable)."""
    if first == 1.0:
        return [1.0] + [0.0] * 15
    if first == 0.5:
        return [0.5, 0.5, 0.5, 0.5] + [0.0] * 12
    return [0.25] * 16


def test_knn_weighted_votes_and_ties():
    query = torch.tensor([_unit16(1.0)])

    def predict(train, k):
        emb = torch.tensor([_unit16(s) for s, _ in train])
        return knn_predict(emb, [label for _, label in train], query, k=k)[0]

    # tie (A: 1.0, B: 0.5 + 0.5) → the nearest neighbour's label
    assert predict([(1.0, "A"), (0.5, "B"), (0.5, "B")], 3) == "A"
    assert predict([(0.5, "A"), (0.5, "A"), (1.0, "B")], 3) == "B"
    # weights, not counts: one vote of 1.0 beats two of 0.25 ...
    assert predict([(0.25, "B"), (1.0, "A"), (0.25, "B")], 3) == "A"
    # ... and three of 0.5 beat one of 1.0
    assert predict([(1.0, "A"), (0.5, "B"), (0.5, "B"), (0.5, "B")], 4) == "B"
    # k = 1 is the nearest neighbour; k larger than the training set uses all of it
    assert predict([(1.0, "A"), (0.5, "B"), (0.5, "B"), (0.5, "B")], 1) == "A"
    assert predict([(1.0, "A"), (0.5, "B"), (0.5, "B"), (0.5, "B")], 50) == "B"


def test_knn_accuracy_per_class_and_unknown_test_classes(capsys):
    train = _angles([0, 10, 180, 190], ["a", "a", "b", "b"], "train.jsonl")
    test = _angles([5, 185, 20, 90], ["a", "b", "b", "z"], "test.jsonl")
    out = knn_accuracy(train, test, k=2)
    assert out["top1"] == pytest.approx(2 / 3)
    assert out["per_class"] == {"a": 1.0, "b": 0.5}
    assert out["num_skipped"] == 1 and "(z)" in capsys.readouterr().err


def _clusters(n_per_class, num_classes, dim, spread, rng):
    centres = rng.normal(size=(num_classes, dim)) * 4
    labels = np.repeat(np.arange(num_classes), n_per_class)
    x = centres[labels] + rng.normal(size=(len(labels), dim)) * spread
    return LabelledEmbeddings(torch.tensor(x, dtype=torch.float32), labels.tolist(), "s.jsonl")


def test_linear_probe_separable_and_shuffled():
    rng = np.random.default_rng(0)
    full = _clusters(90, 4, 8, 0.5, rng)
    idx = np.arange(len(full))
    parts = [idx % 3 == i for i in range(3)]
    train, val, test = (
        LabelledEmbeddings(full.embeddings[p], [full.labels[i] for i in idx[p]], f"{n}.jsonl")
        for p, n in zip(parts, ("train", "val", "test"), strict=True)
    )
    score = fit_linear_probe(train, val, test)
    assert score.top1 >= 0.97 and score.c in score.val_top1 and set(score.per_class) == {"0", "1", "2", "3"}
    # labels independent of the embeddings: chance (1/4) on test
    noise = [
        LabelledEmbeddings(
            torch.randn(400, 16, generator=torch.Generator().manual_seed(i)), rng.integers(0, 4, 400).tolist()
        )
        for i in range(3)
    ]
    assert fit_linear_probe(*noise).top1 < 0.36
