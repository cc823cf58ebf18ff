"""Weighted k-nearest-neighbour classification: each test image gets the label its neighbours vote for.

The k nearest training images (by cosine similarity, ranked by
:func:`vembed.neighbours.topk`) each vote for their label with their similarity as weight;
the label with the largest total wins, and equal totals go to the label of the nearest neighbour
among them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from vembed.data.records import RecordSet
from vembed.errors import VembedError
from vembed.evaluation.base import (
    EmbedOptions,
    EvalResult,
    LabelledEmbeddings,
    accuracy_by_class,
    drop_unknown_labels,
    embed_labelled,
    label_sort_key,
    report_json,
)
from vembed.models.embedder import Embedder
from vembed.neighbours import topk

DEFAULT_K = 20


def knn_predict(
    train_embeddings: torch.Tensor,
    train_labels: Sequence,
    test_embeddings: torch.Tensor,
    *,
    k: int = DEFAULT_K,
) -> list:
    """The similarity-weighted majority label of each test row's ``k`` nearest training rows."""
    if k < 1:
        raise VembedError(f"--k must be at least 1, got {k}")
    classes = sorted(set(train_labels), key=label_sort_key)
    code = {label: i for i, label in enumerate(classes)}
    train_codes = torch.tensor([code[label] for label in train_labels], dtype=torch.long)
    scores, neighbours = topk(
        F.normalize(test_embeddings.float(), dim=-1), F.normalize(train_embeddings.float(), dim=-1), k
    )
    voted = train_codes[neighbours]  # [N, k] class codes, nearest first
    votes = torch.zeros(len(voted), len(classes), dtype=torch.float64)
    votes.scatter_add_(1, voted, scores.double())
    # first rank at which each class appears among the neighbours (k when it does not)
    ranks = torch.arange(voted.shape[1]).expand_as(voted)
    first = torch.full_like(votes, float(voted.shape[1]))
    first.scatter_reduce_(1, voted, ranks.double(), reduce="amin")
    tied = votes == votes.max(dim=1, keepdim=True).values
    winner = torch.where(tied, first, torch.inf).argmin(dim=1)
    return [classes[int(i)] for i in winner]


@dataclass
class KnnResult:
    """Top-1 and per-class accuracy of weighted kNN (test classes absent from train left out)."""

    model: str
    train: str
    test: str
    k: int
    top1: float
    per_class: dict[str, float]
    queries: int
    num_skipped: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return report_json(self)


def knn_accuracy(train: LabelledEmbeddings, test: LabelledEmbeddings, *, k: int = DEFAULT_K) -> dict:
    """``{"top1", "per_class", "queries", "num_skipped"}`` of weighted kNN on embedded splits."""
    kept = drop_unknown_labels(test, set(train.labels), reference=train.source or "the training records")
    predicted = knn_predict(train.embeddings, train.labels, kept.embeddings, k=k)
    correct = sum(p == t for p, t in zip(predicted, kept.labels, strict=True))
    return {
        "top1": correct / len(kept),
        "per_class": accuracy_by_class(kept.labels, predicted),
        "queries": len(kept),
        "num_skipped": len(test) - len(kept),
    }


class KnnEvaluator:
    """``evaluator(embedder) -> EvalResult``: ``{"knn_top1"}`` of the ``test`` records against the
    ``train`` records' neighbours; ``details["report"]`` is a :class:`KnnResult` (per-class accuracy)."""

    name = "knn"
    primary_metric = "knn_top1"
    greater_is_better = True
    metrics = ["knn_top1"]

    def __init__(
        self, train: RecordSet, test: RecordSet, *, k: int = DEFAULT_K, embed: EmbedOptions = EmbedOptions()
    ):
        if k < 1:
            raise VembedError(f"--k must be at least 1, got {k}")
        self.train, self.test, self.k, self.embed = train, test, k, embed

    def __call__(self, embedder: Embedder, *, show_progress: bool = True) -> EvalResult:
        options = replace(self.embed, show_progress=show_progress)
        train = embed_labelled(embedder, self.train, options, description="embedding train")
        test = embed_labelled(embedder, self.test, options, description="embedding test")
        scores = knn_accuracy(train, test, k=self.k)
        report = KnnResult(model="", train=str(self.train.path), test=str(self.test.path), k=self.k, **scores)
        return EvalResult(
            {"knn_top1": scores["top1"]},
            self.primary_metric,
            self.greater_is_better,
            details={"report": report},
        )
