"""Validation during training: the task's evaluator (the same objects ``vembed eval`` runs) on
``data.val``; the loop takes ``EvalResult.metrics``.

For retrieval, :func:`retrieval_validator` builds a
:class:`~vembed.evaluation.run.RetrievalEvaluator` (Recall@K / MAP@R all-vs-all, plus the classifier's
top-1 / top-5 when the loss trains one), computing in the dtype ``model.dtype`` infers with.
:class:`CachedFeatureValidator` serves ``method=frozen`` with ``train.cache_features``: the frozen
backbone's features do not change between validations, so only the head runs and the evaluator
scores the result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from vembed.evaluation.base import EvalResult
from vembed.evaluation.options import embed_options, retrieval_options
from vembed.evaluation.run import RetrievalEvaluator
from vembed.models.embedder import Embedder
from vembed.models.heads import ClassifierHead
from vembed.neighbours import ranking_device
from vembed.settings import Settings
from vembed.training.data import LabelledImages


def inference_autocast(device: torch.device, weights: torch.dtype, dtype: str):
    """A bf16/fp16 autocast for validating fp32 training weights where ``model.dtype`` (auto) computes
    inference in it (GPUs, CPUs with native bf16); None where inference is fp32."""
    from vembed.models.precision import resolve_dtype

    target = resolve_dtype(dtype, device)
    if target == weights or target not in (torch.bfloat16, torch.float16):
        return None
    return functools.partial(torch.autocast, device.type, dtype=target)


def retrieval_validator(
    data: LabelledImages,
    settings: Settings,
    *,
    accelerator,
    classifier: Callable[[], ClassifierHead] | None = None,
) -> RetrievalEvaluator:
    """The retrieval evaluator on the validation records (their dense label codes, class names)."""
    autocast = inference_autocast(accelerator.device, torch.float32, settings.model.dtype)
    return RetrievalEvaluator(
        data.records,
        data.labels,
        embed=embed_options(settings),
        options=retrieval_options(settings),
        classifier=classifier,
        class_names=data.class_names,
        description="validating",
        autocast=autocast or accelerator.autocast,
    )


class CachedFeatureValidator:
    """The evaluator's metrics of ``embedder.head`` on pooled backbone features computed once."""

    def __init__(self, evaluator: RetrievalEvaluator, features: torch.Tensor, indices: list[int], labels):
        self.evaluator, self.features = evaluator, features
        self.labels = [labels[i] for i in indices]
        self.name, self.primary_metric = evaluator.name, evaluator.primary_metric
        self.greater_is_better = evaluator.greater_is_better

    @property
    def metrics(self) -> list[str]:
        return self.evaluator.metrics

    def __call__(self, embedder: Embedder, *, show_progress: bool = True) -> EvalResult:
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
        return self.evaluator.score(
            torch.cat(chunks), self.labels, normalize=embedder.normalize, device=ranking_device(embedder)
        )
