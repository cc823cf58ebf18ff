"""Predict classes with a model that carries a classifier head (a ``ce`` run's ``final/`` or its export).

Images are embedded by :func:`vembed.inference.embed_records` (the one embedding path); the head turns
the embeddings into class probabilities. ``vembed classify`` and ``vembed eval classify`` both call
:func:`predict_probabilities`, so their predictions agree by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vembed.data.records import ImageRecord
from vembed.errors import VembedError
from vembed.inference import EmbedOptions, embed_options, embed_records
from vembed.models.embedder import Embedder
from vembed.models.heads import ClassifierHead, require_classifier
from vembed.settings import Settings


@dataclass
class Prediction:
    """The ``top`` classes of one image, most probable first."""

    image: str
    labels: list
    probabilities: list[float]

    @property
    def label(self):
        return self.labels[0]

    @property
    def probability(self) -> float:
        return self.probabilities[0]

    def to_json(self) -> dict:
        return {
            "image": self.image,
            "label": self.label,
            "probability": round(self.probability, 6),
            "top": [
                {"label": label, "probability": round(p, 6)}
                for label, p in zip(self.labels, self.probabilities, strict=True)
            ],
        }


@dataclass
class Probabilities:
    """Class probabilities ``[N_ok, C]`` for the records that decoded, in record order."""

    probabilities: torch.Tensor
    indices: list[int]
    labels: list  # the head's class names, one per column
    problems: list[str] = field(default_factory=list)


def load_classifier_model(
    model: str | Path, settings: Settings | None = None
) -> tuple[Embedder, ClassifierHead]:
    """The embedding model and its classifier head; a model without one is a one-line error."""
    from vembed.models.factory import create_embedder
    from vembed.models.loader import load_model

    settings = settings or Settings()
    loaded = load_model(model, revision=settings.model.revision, weights=False)  # files read once
    head = require_classifier(loaded)  # before the backbone is loaded
    embedder = create_embedder(loaded, settings.model)
    if embedder.embed_dim != head.embed_dim:
        raise VembedError(
            f"{model}: the classifier takes {head.embed_dim}-d embeddings but the model now gives "
            f"{embedder.embed_dim}-d (model.truncate_dim / model.projection_dim differ from training)"
        )
    return embedder, head


def predict_probabilities(
    embedder: Embedder,
    head: ClassifierHead,
    records: Sequence[ImageRecord],
    options: EmbedOptions = EmbedOptions(),
) -> Probabilities:
    """Embed ``records`` and apply the head: softmax probabilities over its classes."""
    out = embed_records(embedder, records, options, description="classifying")
    probs = head.probabilities(out.embeddings) if out.indices else torch.empty(0, head.num_classes)
    return Probabilities(probs, out.indices, list(head.labels), out.problems)


def top_predictions(result: Probabilities, records: Sequence[ImageRecord], top: int = 3) -> list[Prediction]:
    """The ``top`` most probable classes of each classified record."""
    if top < 1:
        raise VembedError(f"--top must be at least 1, got {top}")
    k = min(top, len(result.labels))
    values, columns = result.probabilities.topk(k, dim=1) if len(result.indices) else (None, None)
    predictions = []
    for row, index in enumerate(result.indices):
        predictions.append(
            Prediction(
                str(records[index].image),
                [result.labels[int(c)] for c in columns[row]],
                [float(v) for v in values[row]],
            )
        )
    return predictions


def classify_images(
    model: str | Path,
    records: Sequence[ImageRecord],
    *,
    top: int = 3,
    settings: Settings | None = None,
    show_progress: bool = True,
) -> tuple[list[Prediction], list[str]]:
    """``(predictions, problems)``: the ``top`` classes of each image, and the images that failed."""
    settings = settings or Settings()
    embedder, head = load_classifier_model(model, settings)
    options = embed_options(settings, show_progress=show_progress)
    result = predict_probabilities(embedder, head, records, options)
    return top_predictions(result, records, top), result.problems
