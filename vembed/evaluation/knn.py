"""Weighted k-nearest-neighbour classification: each test image gets the label its neighbours vote for.

The k nearest training images (by cosine similarity, ranked by
:func:`vembed.neighbours.topk`) each vote for their label with their similarity as weight;
the label with the largest total wins, and equal totals go to the label of the nearest neighbour
among them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vembed.errors import VembedError
from vembed.evaluation.base import (
    EmbedOptions,
    LabelledEmbeddings,
    accuracy_by_class,
    drop_unknown_labels,
    embed_labelled,
    embedder_for,
    label_sort_key,
    model_name,
    read_labelled,
)
from vembed.models.embedder import Embedder
from vembed.neighbours import topk
from vembed.settings import Settings

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
        return {
            "model": self.model,
            "train": self.train,
            "test": self.test,
            "k": self.k,
            "top1": self.top1,
            "per_class": self.per_class,
            "queries": self.queries,
            "num_skipped": self.num_skipped,
            "seconds": round(self.seconds, 3),
        }


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
    """The evaluator contract: ``{"knn_top1": ...}`` of ``test`` against ``train``."""

    primary_metric = "knn_top1"

    def __init__(
        self, train: str | Path, test: str | Path, *, k: int = DEFAULT_K, settings: Settings | None = None
    ):
        self.train, self.test = read_labelled(train, settings), read_labelled(test, settings)
        self.k = k
        self.options = EmbedOptions.from_settings(settings or Settings(), show_progress=False)

    def __call__(self, embedder: Embedder) -> dict[str, float]:
        train = embed_labelled(embedder, self.train, self.options)
        test = embed_labelled(embedder, self.test, self.options)
        return {"knn_top1": knn_accuracy(train, test, k=self.k)["top1"]}


def evaluate_knn(
    model: str | Path | Embedder,
    train: str | Path,
    test: str | Path,
    *,
    k: int = DEFAULT_K,
    settings: Settings | None = None,
    show_progress: bool = True,
) -> KnnResult:
    """Weighted kNN accuracy of ``model``: ``test`` records classified by their ``train`` neighbours."""
    start = time.perf_counter()
    settings = settings or Settings()
    if k < 1:
        raise VembedError(f"--k must be at least 1, got {k}")
    train_records, test_records = read_labelled(train, settings), read_labelled(test, settings)
    embedder = embedder_for(model, settings)
    options = EmbedOptions.from_settings(settings, show_progress=show_progress)
    train_emb = embed_labelled(embedder, train_records, options, description="embedding train")
    test_emb = embed_labelled(embedder, test_records, options, description="embedding test")
    scores = knn_accuracy(train_emb, test_emb, k=k)
    return KnnResult(
        model=model_name(model),
        train=str(train),
        test=str(test),
        k=k,
        seconds=time.perf_counter() - start,
        **scores,
    )
