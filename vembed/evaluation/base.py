"""What every evaluator shares: the contract, labelled embeddings, and the checks on class labels.

The contract (sentence-transformers style): an evaluator is a callable ``evaluator(model) ->
EvalResult(metrics, primary_metric, greater_is_better, details)``, built from records and small option
objects (:mod:`vembed.evaluation.options`). Training validation and ``vembed eval`` call the same
objects; every ``vembed eval`` subcommand runs one through :func:`vembed.evaluation.compare.compare`
and only renders the result.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from vembed.console import log
from vembed.data.records import ImageRecord, RecordSet, read_records
from vembed.errors import VembedError
from vembed.inference import EmbedOptions, embed_records
from vembed.models.embedder import Embedder, truncate_embeddings

__all__ = [
    "IN_PERCENT_POINTS",
    "EmbedOptions",
    "EvalResult",
    "Evaluator",
    "LabelledEmbeddings",
    "as_percent",
    "embed_labelled",
    "parse_dims",
    "read_eval_records",
]


# metrics already in percent points (``rsum``: six recalls in percent, summed, 0-600); every other
# score an evaluator reports is a fraction, shown × 100
IN_PERCENT_POINTS = frozenset({"rsum"})


def as_percent(name: str, value: float) -> float:
    """Metric ``name``'s ``value`` in percent points, as tables print it."""
    return value if name in IN_PERCENT_POINTS else 100 * value


@dataclass
class EvalResult:
    """What an evaluator returns: its metrics, the one that ranks models, and which way is better.

    ``details`` holds what a report or picture needs beyond the numbers (per-class tables, curves).
    """

    metrics: dict[str, float]
    primary_metric: str
    greater_is_better: bool = True
    details: dict = field(default_factory=dict)

    @property
    def primary(self) -> float:
        return self.metrics[self.primary_metric]


@runtime_checkable
class Evaluator(Protocol):
    """``evaluator(model) -> EvalResult``: training validation and ``vembed eval`` call the same objects.

    ``metrics`` lists (before running) what ``EvalResult.metrics`` will hold, so ``train.select_metric``
    can be checked before training; ``metrics[primary_metric]`` ranks models.
    """

    name: str
    primary_metric: str
    greater_is_better: bool

    @property
    def metrics(self) -> list[str]: ...

    def __call__(self, model, *, show_progress: bool = True) -> EvalResult: ...


@dataclass
class LabelledEmbeddings:
    """Embeddings ``[N, D]`` of the records that decoded, with their labels, in record order."""

    embeddings: torch.Tensor
    labels: list
    source: str = ""  # the records file, for messages
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def truncated(self, dim: int | None, *, normalize: bool = True) -> LabelledEmbeddings:
        """The first ``dim`` dims re-normalised (``None``: unchanged)."""
        if dim is None or dim == self.embeddings.shape[1]:
            return self
        if dim > self.embeddings.shape[1]:
            raise VembedError(
                f"--dims {dim} is wider than the model's {self.embeddings.shape[1]}-d embeddings"
            )
        emb = truncate_embeddings(self.embeddings, dim, normalize=normalize)
        return LabelledEmbeddings(emb, self.labels, self.source, self.problems)


def report_json(report, *, merged: Sequence[str] = ()) -> dict:
    """A report dataclass as JSON, field by field in order: ``seconds`` rounded to the millisecond, the
    ``labels`` and ``confusion`` fields as one ``"confusion": {"labels", "matrix"}``, and the dict
    fields named in ``merged`` spread in place."""
    out: dict = {}
    for f in dataclasses.fields(report):
        value = getattr(report, f.name)
        if f.name in merged:
            out.update(value)
        elif f.name == "confusion":
            out["confusion"] = {"labels": report.labels, "matrix": value}
        elif f.name == "seconds":
            out["seconds"] = round(value, 3)
        elif not (f.name == "labels" and hasattr(report, "confusion")):
            out[f.name] = value
    return out


def read_eval_records(path: str | Path, *, image_root=None, skip_bad: bool = False) -> RecordSet:
    """The labelled image records an evaluation scores (bad records logged, or an error without
    ``skip_bad``; a file with no usable record is an error)."""
    records = read_records(path, image_root=image_root, skip_bad=skip_bad, require_label=True)
    if records.problems:
        log(f"[yellow]skipped {len(records.problems)} bad record(s)[/]; first: {records.problems[0]}")
    if not records.records:
        raise VembedError(f"{path}: no usable records")
    return records


def embed_labelled(
    embedder: Embedder,
    records: RecordSet | Sequence[ImageRecord],
    options: EmbedOptions = EmbedOptions(),
    *,
    description: str = "embedding",
) -> LabelledEmbeddings:
    """Embed labelled records through :func:`vembed.inference.embed_records` (the one embedding path)."""
    source = str(records.path) if isinstance(records, RecordSet) else ""
    images = records.images() if isinstance(records, RecordSet) else list(records)
    out = embed_records(embedder, images, options, description=description)
    if out.problems:
        log(f"[yellow]{source}: skipped {len(out.problems)} bad image(s)[/]; first: {out.problems[0]}")
    if not out.indices:
        raise VembedError(f"{source or 'records'}: no image could be embedded")
    return LabelledEmbeddings(out.embeddings, [images[i].label for i in out.indices], source, out.problems)


def parse_dims(value: str | Sequence[int] | None) -> list[int]:
    """``"64,128,768"`` → ``[64, 128, 768]`` (positive, distinct, in the order given)."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else list(value)
    dims: list[int] = []
    for part in parts:
        try:
            dim = int(str(part).strip())
        except ValueError:
            raise VembedError(
                f"--dims: {str(part).strip()!r} is not an integer (e.g. --dims 64,128,768)"
            ) from None
        if dim < 1:
            raise VembedError(f"--dims: widths must be positive, got {dim}")
        if dim not in dims:
            dims.append(dim)
    return dims


def drop_unknown_labels(
    data: LabelledEmbeddings, known: set, *, reference: str, what: str = "queries", warn: bool = True
) -> LabelledEmbeddings:
    """Leave out the items whose label never occurs in ``known`` (the support / training classes).

    Warns once, naming the file, how many items and which classes; raises when nothing is left.
    """
    missing = Counter(label for label in data.labels if label not in known)
    if not missing:
        return data
    count = sum(missing.values())
    if warn:
        log(
            f"[yellow]warning:[/] {data.source}: {count} {what} of {len(missing)} class(es) absent from "
            f"{reference} ({class_list(missing)}) are left out"
        )
    keep = [i for i, label in enumerate(data.labels) if label in known]
    if not keep:
        raise VembedError(f"{data.source}: no {what} has a class that occurs in {reference}")
    index = torch.tensor(keep, dtype=torch.long)
    return LabelledEmbeddings(
        data.embeddings[index], [data.labels[i] for i in keep], data.source, data.problems
    )


def class_list(classes, limit: int = 8) -> str:
    """``"a, b, c"`` (sorted, at most ``limit`` names, then ``+N more``)."""
    names = sorted(classes, key=str)
    text = ", ".join(str(n) for n in names[:limit])
    return text + (f", +{len(names) - limit} more" if len(names) > limit else "")


def accuracy_by_class(truth: Sequence, predicted: Sequence) -> dict[str, float]:
    """Per-class top-1 accuracy (recall), keyed by the class label as text, in sorted label order."""
    totals: Counter = Counter(truth)
    correct: Counter = Counter(t for t, p in zip(truth, predicted, strict=True) if t == p)
    return {str(label): correct[label] / totals[label] for label in sorted(totals, key=label_sort_key)}


def label_sort_key(label) -> tuple:
    return (0, label, "") if isinstance(label, int) else (1, 0, str(label))
