"""Validation during training: Recall@K / MAP@R on the validation split, all-vs-all.

A run whose loss trains a classifier (``ce``) also reports its top-1 / top-5 accuracy on the same
embeddings (``top1``, ``top5``), so ``train.select_metric=top1`` can choose the model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

from vembed.evaluation.retrieval import retrieval_metrics
from vembed.inference import embed_records
from vembed.models.embedder import Embedder
from vembed.models.heads import ClassifierHead
from vembed.neighbours import ranking_device
from vembed.settings import Settings
from vembed.training.data import LabelledImages


def inference_autocast(embedder: Embedder, dtype: str):
    """A bf16/fp16 autocast for validating fp32 training weights where ``model.dtype`` (auto) computes
    inference in it (GPUs, CPUs with native bf16); None where inference is fp32."""
    from vembed.models.precision import resolve_dtype

    target = resolve_dtype(dtype, embedder.device)
    if target == embedder.dtype or target not in (torch.bfloat16, torch.float16):
        return None
    return functools.partial(torch.autocast, embedder.device.type, dtype=target)


class Validator:
    """Embeds the validation records with the model's one inference path and scores them.

    With ``features`` (pooled backbone features of the records, ``method=frozen`` with a cache) only the
    head runs: the frozen backbone's features do not change between validations.
    """

    def __init__(
        self,
        data: LabelledImages,
        settings: Settings,
        *,
        features: torch.Tensor | None = None,
        feature_indices: list[int] | None = None,
        classifier: Callable[[], ClassifierHead] | None = None,
    ):
        self.data = data
        self.settings = settings
        self.features = features
        self.feature_indices = feature_indices
        self.classifier = classifier  # the head as it is now (a ce run's loss), called at each validation

    def __call__(
        self, embedder: Embedder, *, autocast=contextlib.nullcontext, show_progress: bool = True
    ) -> dict:
        # Validation must not move the training RNG streams (a resumed run would diverge).
        devices = [embedder.device] if embedder.device.type == "cuda" else []
        autocast = inference_autocast(embedder, self.settings.model.dtype) or autocast
        with torch.random.fork_rng(devices=devices), autocast():
            embeddings, indices, problems = self._embed(embedder, show_progress)
        labels = [self.data.labels[i] for i in indices]
        ev = self.settings.eval
        metrics = retrieval_metrics(
            embeddings, labels, ks=tuple(ev.k), chunk_size=ev.chunk_size, device=ranking_device(embedder)
        )
        if self.classifier is not None:
            names = [self.data.class_names[code] for code in labels]
            metrics.update(classifier_accuracy(self.classifier(), embeddings, names))
        if problems:
            metrics["num_bad_images"] = len(problems)
        return metrics

    def _embed(self, embedder: Embedder, show_progress: bool) -> tuple[torch.Tensor, list[int], list[str]]:
        if self.features is not None:
            was_training = embedder.training
            embedder.eval()
            try:
                with torch.inference_mode():
                    chunks = [
                        embedder.head(chunk.to(embedder.device)).float().cpu()
                        for chunk in self.features.split(4096)
                    ]
            finally:
                embedder.train(was_training)
            return torch.cat(chunks), list(self.feature_indices or []), []
        result = embed_records(
            embedder,
            self.data.records,
            batch_size=self.settings.eval.batch_size,
            num_workers=self.settings.data.num_workers,
            skip_bad=self.settings.data.skip_bad,
            show_progress=show_progress,
            description="validating",
        )
        return result.embeddings, result.indices, result.problems


def classifier_accuracy(head: ClassifierHead, embeddings: torch.Tensor, labels: list) -> dict[str, float]:
    """``{"top1", "top5"}`` of ``head`` on the records whose class it knows ({} when it knows none)."""
    from vembed.evaluation.classify import classification_scores, label_columns

    columns = label_columns(head.labels, labels, source="validation", warn=False, strict=False)
    keep = [i for i, c in enumerate(columns) if c is not None]
    if not keep:
        return {}
    with torch.inference_mode():
        probs = head.probabilities(embeddings[torch.tensor(keep, dtype=torch.long)])
    scores = classification_scores(probs, [columns[i] for i in keep], head.labels)
    return {"top1": scores["top1"], "top5": scores["top5"]}
