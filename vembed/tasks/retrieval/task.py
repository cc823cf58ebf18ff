"""``train.task: retrieval`` on the task contract: the :class:`~vembed.models.embedder.Embedder` with its
method applied, labelled image records, a metric-learning (or ``ce``) loss, P×K or shuffled batches,
and validation by Recall@K / MAP@R (plus top-1 / top-5 when the loss trains a classifier, which is
then the model's saved head).

Its pieces live in :mod:`vembed.training` (``model``, ``data``, ``steps``) and :mod:`vembed.losses`,
which the other tasks reuse where they fit (epoch loaders, samplers).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from vembed.errors import VembedError
from vembed.io import atomic_dir
from vembed.losses import LOSSES, loss_class
from vembed.models.factory import save_model
from vembed.models.heads import classifier_of_loss
from vembed.models.lora import merge_lora
from vembed.settings import Settings
from vembed.settings.augment import AugmentSettings
from vembed.tasks.base import TrainParts
from vembed.training.data import AUGMENT_DEFAULTS, build_batch_sampler, read_labelled, report_problems
from vembed.training.model import check_objective, loss_kwargs, make_loss, trainable_embedder
from vembed.training.remine import remining
from vembed.training.steps import cache_features, step_runner, uses_feature_cache
from vembed.training.validation import CachedFeatureValidator, retrieval_validator


class RetrievalTask:
    name: ClassVar[str] = "retrieval"
    keys: ClassVar[tuple[str, ...]] = ("hard_negatives", "remine_every")

    def check(self, settings: Settings) -> None:
        s = settings.train
        if s.loss.strip().lower() not in LOSSES:
            try:
                loss_kwargs(s)
            except VembedError as exc:
                raise VembedError(f"train.loss={s.loss!r}: {exc}") from None
        loss_kwargs(s)
        if s.remine_every and not s.hard_negatives:
            raise VembedError(
                "train.remine_every re-mines the negatives of train.hard_negatives; set train.hard_negatives=K"
            )

    def metrics(self, settings: Settings) -> list[str]:
        metrics = [f"recall@{k}" for k in settings.eval.k] + ["map@r"]
        if getattr(loss_class(settings.train.loss), "trains_classifier", False):
            metrics += ["top1", "top5"]
        return metrics

    def select_metric(self, settings: Settings) -> str:
        return settings.train.select_metric

    def describe(self, settings: Settings) -> str:
        """The settings that decide :meth:`metrics`, for messages."""
        return f"train.loss={settings.train.loss}, eval.k={','.join(map(str, settings.eval.k))}"

    def augment(self, settings: Settings) -> AugmentSettings:
        """``train.augment`` with this task's defaults for the keys not given."""
        return settings.train.augment.with_defaults(**AUGMENT_DEFAULTS)

    def setup(self, settings: Settings, accelerator, *, show_progress: bool = True) -> TrainParts:
        acc = accelerator
        embedder = trainable_embedder(settings)  # LoRA target errors: before any data is read
        check_objective(settings.train, embedder)
        data = read_labelled(settings.data.train, settings, what="training")
        val = read_labelled(settings.data.val, settings, what="validation") if settings.data.val else None
        report_problems(data, val)
        embedder.to(acc.device)
        features = val_features = None
        if uses_feature_cache(settings):
            data, features, val_features = cache_features(
                acc, embedder, data, val, settings, show_progress=show_progress and acc.is_main_process
            )
        loss = make_loss(settings.train, embed_dim=embedder.embed_dim, num_classes=data.num_classes)
        loss = loss.to(acc.device)
        sampler = build_batch_sampler(
            data, settings.train, num_replicas=acc.num_processes, rank=acc.process_index
        )
        if settings.train.remine_every:
            sampler = remining(sampler, embedder, data, settings, acc, show_progress=show_progress)
        evaluator = None
        if val is not None:
            trains_classifier = classifier_of_loss(loss, data.class_names) is not None
            classifier = (lambda: classifier_of_loss(loss, data.class_names)) if trains_classifier else None
            evaluator = retrieval_validator(val, settings, accelerator=acc, classifier=classifier)
            if val_features is not None:
                evaluator = CachedFeatureValidator(evaluator, *val_features, val.labels)
        runner = step_runner(acc, embedder, loss, data, settings, features)
        return TrainParts(embedder, data, loss, sampler, runner, evaluator)

    def save(self, out: Path, parts: TrainParts, training: dict) -> None:
        """``final/``: LoRA merged, with the classifier a ``ce`` loss trained as its head."""
        head = classifier_of_loss(parts.loss, parts.data.class_names)
        with atomic_dir(out) as tmp:
            save_model(merge_lora(parts.model), tmp, extra={"training": training}, head=head)
