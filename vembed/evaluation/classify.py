"""Accuracy of a model's classifier head on labelled records: top-1/top-5, per-class P/R/F1, confusion.

Data labels are matched to the head's class names as text (``3`` and ``"3"`` are the same class).
Records of classes the head does not know are left out with one warning naming the file and the
classes; when none is known, the run and the data disagree entirely and it is an error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from vembed.classify import predict_probabilities
from vembed.console import log
from vembed.data.records import RecordSet
from vembed.errors import VembedError
from vembed.evaluation.base import EmbedOptions, EvalResult, class_list, report_json
from vembed.models.embedder import Embedder
from vembed.models.heads import ClassifierHead


def label_columns(
    head_labels: Sequence,
    data_labels: Sequence,
    *,
    source: str,
    model: str = "the model",
    warn: bool = True,
    strict: bool = True,
) -> list[int | None]:
    """The head's column of each data label (None when the head does not know the class).

    Unknown classes are named in one warning (``warn``); when no class is known it is an error
    (``strict``) or every column is None.
    """
    column = {str(label): i for i, label in enumerate(head_labels)}
    columns = [column.get(str(label)) for label in data_labels]
    unknown = Counter(str(label) for label, c in zip(data_labels, columns, strict=True) if c is None)
    if strict and unknown and len(unknown) == len({str(label) for label in data_labels}):
        raise VembedError(
            f"{source}: none of its classes ({class_list(unknown)}) is among the {len(head_labels)} classes "
            f"{model} was trained on ({class_list(head_labels)}): label names differ between the run and the data"
        )
    if unknown and warn:
        log(
            f"[yellow]warning:[/] {source}: {sum(unknown.values())} record(s) of {len(unknown)} class(es) "
            f"{model} was not trained on ({class_list(unknown)}) are left out"
        )
    return columns


def classification_scores(probabilities: torch.Tensor, truth: Sequence[int], labels: Sequence) -> dict:
    """Top-1/top-5, per-class precision/recall/F1/support and the confusion matrix (rows: true class)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    truth_t = torch.as_tensor(list(truth), dtype=torch.long)
    ranked = probabilities.topk(min(5, probabilities.shape[1]), dim=1).indices
    hits = ranked == truth_t[:, None]
    predicted = ranked[:, 0].numpy()
    classes = np.arange(len(labels))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth_t.numpy(), predicted, labels=classes, zero_division=0
    )
    per_class = {
        str(labels[c]): {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
        }
        for c in classes
    }
    return {
        "top1": int(hits[:, 0].sum()) / len(truth_t),
        "top5": int(hits.any(dim=1).sum()) / len(truth_t),
        "per_class": per_class,
        "confusion": confusion_matrix(truth_t.numpy(), predicted, labels=classes).tolist(),
        "predicted": predicted.tolist(),
    }


def classifier_accuracy(head: ClassifierHead, embeddings: torch.Tensor, labels: Sequence) -> dict[str, float]:
    """``{"top1", "top5"}`` of ``head`` on the embeddings whose class it knows ({} when it knows none)."""
    columns = label_columns(head.labels, labels, source="validation", warn=False, strict=False)
    keep = [i for i, c in enumerate(columns) if c is not None]
    if not keep:
        return {}
    with torch.inference_mode():
        probs = head.probabilities(embeddings[torch.tensor(keep, dtype=torch.long)])
    scores = classification_scores(probs, [columns[i] for i in keep], head.labels)
    return {"top1": scores["top1"], "top5": scores["top5"]}


@dataclass
class ClassifyResult:
    """``vembed eval classify``: the head's accuracy on one records file."""

    model: str
    data: str
    top1: float
    top5: float
    per_class: dict[str, dict]
    labels: list[str]  # rows/columns of the confusion matrix
    confusion: list[list[int]]
    queries: int
    num_skipped: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return report_json(self)


def _score(embedder: Embedder, head: ClassifierHead, records, options: EmbedOptions, source: str):
    """``(scores, records scored, records left out)``; warnings are the caller's (label_columns)."""
    result = predict_probabilities(embedder, head, records, options)
    if not result.indices:
        raise VembedError(f"{source}: no image could be classified")
    columns = label_columns(
        head.labels, [records[i].label for i in result.indices], source=source, warn=False
    )
    keep = [row for row, c in enumerate(columns) if c is not None]
    if not keep:
        raise VembedError(f"{source}: no record has a class the classifier knows")
    probs = result.probabilities[torch.tensor(keep, dtype=torch.long)]
    scores = classification_scores(probs, [columns[row] for row in keep], head.labels)
    return scores, len(keep), len(records) - len(keep)


class ClassifyEvaluator:
    """``evaluator(model) -> EvalResult``: ``{"top1", "top5"}`` of a classifier head on ``data``.

    ``model`` is an ``(embedder, head)`` pair (:func:`vembed.classify.load_classifier_model`), or an
    :class:`Embedder` with ``head`` fixed here. ``details["report"]`` is a :class:`ClassifyResult`
    (per-class precision/recall/F1, the confusion matrix).
    """

    name = "classify"
    primary_metric = "top1"
    greater_is_better = True
    metrics = ["top1", "top5"]

    def __init__(
        self, data: RecordSet, *, embed: EmbedOptions = EmbedOptions(), head: ClassifierHead | None = None
    ):
        self.source = str(data.path)
        self.records = data.images()
        self.embed, self.head = embed, head

    def __call__(self, model, *, show_progress: bool = True) -> EvalResult:
        embedder, head = model if isinstance(model, tuple) else (model, self.head)
        if head is None:
            raise VembedError("ClassifyEvaluator needs a classifier head")
        name = embedder.spec.name
        label_columns(head.labels, [r.label for r in self.records], source=self.source, model=name)
        options = replace(self.embed, show_progress=show_progress)
        scores, used, skipped = _score(embedder, head, self.records, options, self.source)
        report = ClassifyResult(
            model="",
            data=self.source,
            top1=scores["top1"],
            top5=scores["top5"],
            per_class=scores["per_class"],
            labels=[str(label) for label in head.labels],
            confusion=scores["confusion"],
            queries=used,
            num_skipped=skipped,
        )
        metrics = {"top1": scores["top1"], "top5": scores["top5"]}
        return EvalResult(metrics, self.primary_metric, self.greater_is_better, details={"report": report})
