"""``train.task: rerank``: a pairwise re-ranker of an embedder's first neighbours (STIR / OML).

The pieces the loop asks for (:class:`vembed.tasks.base.Task`): the :class:`~vembed.models.pairwise.PairwiseModel`
(``model.name``'s backbone — by default ``train.rerank_from``'s own — and an MLP to one logit, with
``train.method`` applied), the pairs mined from ``train.rerank_from``'s top ``train.rerank_top_n`` on
``data.train`` (:mod:`~vembed.tasks.rerank.mining`), BCE (positives weighted by the negatives/positives
ratio), shuffled pair batches, the step runner and the validator (re-ranked Recall@1 of the same
embedder's top-N on ``data.val``, blend weight chosen on the grid). ``final/`` is the backbone with the
pairwise head (``vembed.json: task_head``, kind ``pairwise``) and the blend weight of the last
calibration on ``data.val`` (0 when the re-ranker does not help).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from vembed.console import log
from vembed.errors import VembedError
from vembed.io import atomic_dir
from vembed.models.factory import ModelOptions, create_embedder, save_model
from vembed.models.lora import merge_lora
from vembed.models.pairwise import PairwiseHead, PairwiseModel
from vembed.settings import Settings
from vembed.settings.augment import AugmentSettings
from vembed.tasks.base import TrainParts
from vembed.tasks.rerank.mining import embed_for_table, mine_pairs, neighbour_table
from vembed.tasks.rerank.steps import PairSet, PairSteps
from vembed.tasks.rerank.validation import METRICS, PRIMARY, RerankValidator
from vembed.training.data import AUGMENT_DEFAULTS, ShuffledBatchSampler, read_labelled, report_problems
from vembed.training.model import apply_method

# train.* keys of the embedding losses: setting one for rerank is an error naming it
OTHER_KEYS = (
    "margin", "scale", "mining", "temperature", "memory_bank", "matryoshka_dims", "samples_per_class",
    "categories_per_batch", "hard_negatives", "remine_every",
)  # fmt: skip


class RerankTask:
    """Everything the loop asks of ``train.task: rerank``."""

    name: ClassVar[str] = "rerank"
    keys: ClassVar[tuple[str, ...]] = ("rerank_from", "rerank_top_n")

    def check(self, settings: Settings) -> None:
        s = settings.train
        if not s.rerank_from:
            raise VembedError(
                "train.task=rerank needs train.rerank_from: the embedding model whose top "
                "train.rerank_top_n neighbours the re-ranker learns to re-score (e.g. train.rerank_from=runs/x/final)"
            )
        if settings.data.val is None:
            raise VembedError(
                "train.task=rerank needs data.val: the blend weight of the re-ranker is chosen on the "
                "validation set (a re-ranker that does not help there gets weight 0)"
            )
        if "loss" in s.model_fields_set and s.loss.strip().lower() != "bce":
            raise VembedError(
                f"train.loss={s.loss!r}: train.task=rerank trains with bce (pairs same/different)"
            )
        for key in OTHER_KEYS:
            if key in s.model_fields_set and getattr(s, key, None) not in (None, False, 0):
                raise VembedError(f"train.{key} does not apply to train.task=rerank (a BCE on mined pairs)")
        if s.sampler == "pk":
            raise VembedError(
                "train.sampler=pk does not apply to train.task=rerank: its batches are shuffled pairs"
            )
        from vembed.models.loader import resolve_ref

        resolve_ref(s.rerank_from)  # a reference that names nothing: before any data is read

    def metrics(self, settings: Settings) -> list[str]:
        return list(METRICS)

    def select_metric(self, settings: Settings) -> str:
        s = settings.train
        return s.select_metric if "select_metric" in s.model_fields_set else PRIMARY

    def describe(self, settings: Settings) -> str:
        return f"train.task={self.name}"

    def augment(self, settings: Settings) -> AugmentSettings:
        return settings.train.augment.with_defaults(**AUGMENT_DEFAULTS)

    # -- the run ----------------------------------------------------------------------------------

    def setup(self, settings: Settings, accelerator, *, show_progress: bool = True) -> TrainParts:
        acc, s = accelerator, settings.train
        model = self.build_model(settings)  # LoRA target errors before any data is read
        data = read_labelled(settings.data.train, settings, what="training")
        val = read_labelled(settings.data.val, settings, what="validation")
        report_problems(data, val)
        show = show_progress and acc.is_main_process
        source = create_embedder(
            s.rerank_from,
            ModelOptions(device=str(acc.device), attention=settings.model.attention, revision=None),
        )
        tables = []
        for what, labelled in (("training", data), ("validation", val)):
            embeddings, rows = embed_for_table(
                source, labelled.records, settings, show_progress=show, what=what
            )
            tables.append(neighbour_table(embeddings, rows, s.rerank_top_n))
        del source
        train_table, val_table = tables
        train_codes = torch.tensor([data.labels[i] for i in train_table.rows])
        pairs = mine_pairs(train_table.candidates, train_codes, train_table.embeddings)
        images = [data.records[i] for i in train_table.rows]
        pair_set = PairSet(pairs, images)
        positives = pair_set.positives
        if positives == 0 or positives == len(pairs):
            raise VembedError(
                f"{settings.data.train}: the mined pairs are all {'different' if positives == 0 else 'same'}; "
                "the re-ranker needs labels with at least 2 images each and more than one label"
            )
        if show:
            log(
                f"re-ranker pairs: {len(pairs)} from the top {s.rerank_top_n} of {s.rerank_from} "
                f"({positives} same, {len(pairs) - positives} different)"
            )
        model.to(acc.device)
        pos_weight = torch.tensor((len(pairs) - positives) / positives)
        loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight).to(acc.device)
        sampler = ShuffledBatchSampler.for_run(len(pairs), s, acc)
        val_codes = torch.tensor([val.labels[i] for i in val_table.rows])
        evaluator = RerankValidator(
            [val.records[i] for i in val_table.rows],
            val_codes,
            val_table,
            batch_size=settings.eval.batch_size,
            num_workers=settings.data.num_workers,
            max_pixels=settings.data.max_image_pixels,
        )
        runner = PairSteps(acc, model, loss, pair_set, settings)
        return TrainParts(model, pair_set, loss, sampler, runner, evaluator)

    def build_model(self, settings: Settings) -> PairwiseModel:
        """``model.name``'s backbone (default: ``train.rerank_from``'s), float32 on the CPU, with a new
        pairwise head and ``train.method`` applied."""
        m, s = settings.model, settings.train
        name = m.name if "name" in m.model_fields_set else s.rerank_from
        dtype = "float32" if m.dtype == "auto" else m.dtype
        embedder = create_embedder(name, m.model_copy(update={"name": name, "device": "cpu", "dtype": dtype}))
        head = PairwiseHead(embedder.feature_dim, top_n=s.rerank_top_n, rerank_from=str(s.rerank_from))
        model = PairwiseModel.from_embedder(embedder, head)
        apply_method(model, s)
        return model

    # -- the model written at the end -------------------------------------------------------------

    def save(self, out: Path, parts: TrainParts, training: dict) -> None:
        """``final/``: LoRA merged, the pairwise head with the blend weight chosen now on ``data.val``."""
        result = parts.evaluator(parts.model, show_progress=False)
        weight = float(result.details["blend_weight"])
        model = merge_lora(parts.model)
        head = copy.deepcopy(model.pair_head).float().cpu()
        head.blend_weight = weight
        settings = parts.runner.settings
        training = {
            **training,
            "task": self.name,
            "loss": "bce",
            "rerank": {
                "rerank_from": str(settings.train.rerank_from),
                "top_n": settings.train.rerank_top_n,
                "blend_weight": weight,
                "validation": {k: round(float(v), 6) for k, v in result.metrics.items()},
                "recall@1_by_weight": {f"{w:g}": round(r, 6) for w, r in result.details["by_weight"].items()},
                "train_pairs": len(parts.data.records),
                "train_positives": parts.data.positives,
            },
        }
        verdict = (
            f"blend weight {weight:g}: validation recall@1 {result.metrics['embedding_recall@1']:.4f} -> "
            f"{result.metrics['recall@1']:.4f}"
            if weight > 0
            else "blend weight 0: the re-ranker did not raise validation recall@1, so it changes nothing"
        )
        log(f"re-ranker calibrated on data.val: {verdict}")
        with atomic_dir(out) as tmp:
            save_model(model, tmp, extra={"training": training}, head=head)
