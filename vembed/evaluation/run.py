"""The retrieval evaluator: embed labelled records, then score them with :mod:`vembed.evaluation.retrieval`.

:class:`RetrievalEvaluator` is what ``vembed eval retrieval`` / ``eval sop`` (through
:func:`vembed.evaluation.compare.compare`), the quickstart and training validation call; its
:meth:`RetrievalEvaluator.score` scores embeddings computed elsewhere (a frozen backbone's cached
features through the head).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vembed.data.records import ImageRecord, RecordSet
from vembed.errors import VembedError
from vembed.evaluation.base import EmbedOptions, EvalResult, read_eval_records
from vembed.evaluation.options import RecordOptions, RetrievalOptions
from vembed.evaluation.retrieval import retrieval_metrics
from vembed.evaluation.sharded_retrieval import sharded_retrieval_metrics
from vembed.inference import embed_records
from vembed.models.embedder import Embedder, truncate_embeddings
from vembed.neighbours import ranking_device
from vembed.processes import Processes

if TYPE_CHECKING:
    from vembed.settings import ModelSettings

__all__ = ["RetrievalEvaluator", "RetrievalReport", "evaluate_retrieval"]


@dataclass
class RetrievalReport:
    """The metrics of one model on one data set (query file, optional gallery file)."""

    model: str
    data: str
    metrics: dict[str, float]
    protocol: str
    gallery: str | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    dims: dict[int, dict[str, float]] = field(default_factory=dict)  # width → metrics (--dims)
    before_rerank: dict[str, float] | None = None  # --rerank: the embedding's own metrics
    rerank: dict | None = None  # --rerank: {"model", "top_n", "blend_weight"}

    def to_json(self) -> dict:
        out = {
            "model": self.model,
            "data": self.data,
            "gallery": self.gallery,
            "protocol": self.protocol,
            **self.metrics,
            "seconds": round(self.seconds, 3),
            "num_bad_images": len(self.problems),
        }
        if self.dims:
            out["dims"] = {str(d): m for d, m in self.dims.items()}
        if self.before_rerank is not None:
            out["before_rerank"] = self.before_rerank
            out["rerank"] = self.rerank
        return out

    def by_width(self) -> list[RetrievalReport]:
        """This report first, then one per ``--dims`` width (named ``model @ N-d``), for tables; with
        ``--rerank`` the embedding's own row comes first, then the re-ranked one."""
        first = [self]
        if self.before_rerank is not None:
            before = RetrievalReport(
                f"{self.model} (embedding)", self.data, self.before_rerank, self.protocol, self.gallery
            )
            name = f"{self.model} + {self.rerank['model']} (top {self.rerank['top_n']})"
            first = [before, RetrievalReport(name, self.data, self.metrics, self.protocol, self.gallery)]
        return first + [
            RetrievalReport(f"{self.model} @ {d}-d", self.data, m, self.protocol, self.gallery)
            for d, m in self.dims.items()
        ]


class RetrievalEvaluator:
    """``evaluator(embedder) -> EvalResult``: Recall@K and MAP@R of labelled records.

    Without ``gallery`` every image queries all the others, itself excluded (the SOP protocol); with
    it, the records search the gallery. ``labels`` default to the records' own (training validation
    passes its dense codes; pairs records share one). With ``classifier`` (a callable returning the
    classifier head as it is now, e.g. a ``ce`` run's) its top-1/top-5 on the same embeddings are
    reported too (labels matched by name: ``class_names[label]`` when given).

    ``processes`` (torchrun / accelerate launch): each process embeds a contiguous share of the
    images and ranking is split across them (:mod:`vembed.evaluation.sharded_retrieval`); every
    process gets the result of the whole set. ``autocast`` (a context-manager factory, e.g. training's
    bf16 inference) wraps the embedding only, never the ranking. ``details["report"]`` is a
    :class:`RetrievalReport`.
    """

    name = "retrieval"
    greater_is_better = True

    def __init__(
        self,
        records: RecordSet | Sequence[ImageRecord],
        labels: Sequence | None = None,
        *,
        gallery: RecordSet | Sequence[ImageRecord] | None = None,
        gallery_labels: Sequence | None = None,
        embed: EmbedOptions = EmbedOptions(),
        options: RetrievalOptions = RetrievalOptions(),
        processes: Processes | None = None,
        classifier: Callable[[], object] | None = None,
        class_names: Sequence | None = None,
        description: str = "embedding queries",
        autocast: Callable[[], object] | None = None,
    ):
        self.processes = processes or Processes()
        if self.processes.world_size > 1 and options.index is not None:
            raise VembedError("--index ranks in one process; run it without torchrun / accelerate launch")
        if options.rerank is not None and (self.processes.world_size > 1 or options.index is not None):
            raise VembedError(
                "--rerank re-scores exact neighbours in one process; drop --index and run it without "
                "torchrun / accelerate launch"
            )
        self.data = str(records.path) if isinstance(records, RecordSet) else ""
        self.gallery_name = None
        if gallery is not None:
            self.gallery_name = str(gallery.path) if isinstance(gallery, RecordSet) else ""
        self.records, self.labels = _labelled(records, labels)
        self.gallery = _labelled(gallery, gallery_labels) if gallery is not None else None
        self.embed, self.options = embed, options
        self.classifier, self.class_names = classifier, class_names
        self.description, self.autocast = description, autocast

    @property
    def primary_metric(self) -> str:
        return "map@r" if self.options.index is None else f"recall@{min(self.options.ks)}"

    @property
    def metrics(self) -> list[str]:
        ks = sorted(set(self.options.ks))
        names = [f"recall@{k}" for k in ks]
        if self.options.index is None:
            names.append("map@r")
        else:
            names += [f"recall_loss@{k}" for k in ks] + ["neighbour_recall@10"]
        return names + (["top1", "top5"] if self.classifier is not None else [])

    def __call__(self, embedder: Embedder, *, show_progress: bool = True) -> EvalResult:
        both = self.gallery is not None
        q_emb, q_labels, problems, q_records = self._embed(
            embedder, self.records, self.labels, self.description, show_progress
        )
        g_emb = g_labels = g_records = None
        if both:
            g_emb, g_labels, g_problems, g_records = self._embed(
                embedder, *self.gallery, "embedding gallery", show_progress
            )
            problems = problems + g_problems
        if self.processes.world_size > 1:  # every process reports the problems of the whole set
            problems = [p for part in self.processes.gather(problems) for p in part]
        return self.score(
            q_emb,
            q_labels,
            gallery_embeddings=g_emb,
            gallery_labels=g_labels,
            problems=problems,
            normalize=embedder.normalize,
            device=self.options.device or ranking_device(embedder),
            show_progress=show_progress,
            records=(q_records, g_records),
        )

    def score(
        self,
        embeddings: torch.Tensor,
        labels: Sequence,
        *,
        gallery_embeddings: torch.Tensor | None = None,
        gallery_labels: Sequence | None = None,
        problems: Sequence[str] = (),
        normalize: bool = True,
        device=None,
        show_progress: bool = False,
        records: tuple | None = None,
    ) -> EvalResult:
        """The metrics of embeddings computed elsewhere (this process' share under ``processes``).

        ``records``: the (query, gallery) records behind the embedding rows, which ``--rerank`` reads.
        """
        o = self.options
        procs = self.processes

        def rank(dim: int | None, rerank=None) -> dict[str, float]:
            kwargs = {}
            if gallery_embeddings is not None:
                kwargs = {
                    "reference_embeddings": _width(gallery_embeddings, dim, normalize),
                    "reference_labels": gallery_labels,
                }
            if o.index is not None:
                from vembed.evaluation.ann_retrieval import ann_retrieval_metrics

                return ann_retrieval_metrics(
                    _width(embeddings, dim, normalize), labels, **kwargs,
                    kind=o.index, settings=o.index_settings, ks=o.ks,
                )  # fmt: skip
            metric = retrieval_metrics if procs.world_size == 1 else sharded_retrieval_metrics
            if rerank is not None:
                kwargs["rerank"] = rerank
            return metric(
                _width(embeddings, dim, normalize), labels, **kwargs, ks=o.ks, chunk_size=o.chunk_size,
                progress=show_progress and dim is None and procs.rank == 0, device=device,
            )  # fmt: skip

        metrics = rank(None)
        before = rerank_info = None
        if o.rerank is not None:
            before, rerank = metrics, self._rerank(embeddings, gallery_embeddings, records)
            metrics = rank(None, rerank)
            problems = list(problems) + [p for p in rerank.problems if p not in problems]
            rerank_info = {"model": o.rerank.name, "top_n": rerank.top_n, "blend_weight": o.rerank.weight}
        if self.classifier is not None and procs.world_size == 1:
            from vembed.evaluation.classify import classifier_accuracy

            names = [self.class_names[label] for label in labels] if self.class_names else list(labels)
            metrics.update(classifier_accuracy(self.classifier(), embeddings, names))
        if problems:
            metrics["num_bad_images"] = len(problems)
        by_dim = {dim: rank(dim) for dim in o.dims}
        report = RetrievalReport(
            model="",
            data=self.data,
            metrics=metrics,
            protocol="query/gallery" if gallery_embeddings is not None else "all-vs-all",
            gallery=self.gallery_name,
            problems=list(problems),
            dims=by_dim,
            before_rerank=before,
            rerank=rerank_info,
        )
        return EvalResult(metrics, self.primary_metric, self.greater_is_better, details={"report": report})

    def _embed(self, embedder, images, labels, description, show_progress):
        procs = self.processes
        start, stop = _share(len(images), procs)
        images, labels = images[start:stop], labels[start:stop]
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            out = embed_records(
                embedder,
                images,
                self.embed,
                show_progress=show_progress and procs.rank == 0,
                description=description
                + (f" (process 0's share of {procs.world_size})" if procs.world_size > 1 else ""),
            )
        return (
            out.embeddings,
            [labels[i] for i in out.indices],
            out.problems,
            [images[i] for i in out.indices],
        )

    def _rerank(self, embeddings, gallery_embeddings, records):
        """The :class:`~vembed.evaluation.reranked.EvalRerank` of ``--rerank`` for these embeddings."""
        from vembed.evaluation.reranked import EvalRerank

        if records is None or records[0] is None:
            raise VembedError("--rerank needs the records behind the embeddings (their images)")
        o = self.options
        queries = embeddings.float().cpu()
        all_vs_all = gallery_embeddings is None
        return EvalRerank(
            o.rerank,
            o.top_n or o.rerank.head.top_n,
            queries,
            queries if all_vs_all else gallery_embeddings.float().cpu(),
            records[0],
            records[0] if all_vs_all else records[1],
            all_vs_all=all_vs_all,
            batch_size=self.embed.batch_size,
            num_workers=self.embed.num_workers,
        )


def evaluate_retrieval(
    model: str | Path | Embedder,
    data: str | Path | RecordSet,
    *,
    gallery: str | Path | RecordSet | None = None,
    model_settings: ModelSettings | None = None,
    records: RecordOptions = RecordOptions(),
    embed: EmbedOptions = EmbedOptions(),
    options: RetrievalOptions = RetrievalOptions(),
    show_progress: bool = True,
) -> RetrievalReport:
    """One model (a reference, loaded once with ``model_settings``, or an :class:`Embedder`) on one
    records file: :class:`RetrievalEvaluator` through :func:`~vembed.evaluation.compare.compare`."""
    from vembed.evaluation.compare import compare

    def read(source):
        if isinstance(source, RecordSet):
            return source
        return read_eval_records(source, image_root=records.image_root, skip_bad=records.skip_bad)

    evaluator = RetrievalEvaluator(
        read(data), gallery=read(gallery) if gallery is not None else None, embed=embed, options=options
    )
    load = None
    if not isinstance(model, Embedder):
        from vembed.models.factory import create_embedder

        load = lambda ref: create_embedder(str(ref), model_settings)  # noqa: E731
    return compare([model], evaluator, load=load, show_progress=show_progress).first.report


def _labelled(records, labels) -> tuple[list[ImageRecord], list]:
    images = records.images() if isinstance(records, RecordSet) else list(records)
    if labels is None:
        labels = [r.label for r in images]
    elif len(labels) != len(images):
        raise VembedError(f"{len(images)} records but {len(labels)} labels")
    return images, list(labels)


def _share(total: int, procs: Processes) -> tuple[int, int]:
    """This process' contiguous share ``[start, stop)`` of ``total`` items (all of them when alone)."""
    size, extra = divmod(total, procs.world_size)
    start = procs.rank * size + min(procs.rank, extra)
    return start, start + size + (procs.rank < extra)


def _width(embeddings, dim: int | None, normalize: bool):
    """The embeddings at a ``--dims`` width (None: as they are)."""
    if dim is None:
        return embeddings
    if dim > embeddings.shape[1]:
        raise VembedError(f"--dims {dim} is wider than the model's {embeddings.shape[1]}-d embeddings")
    return truncate_embeddings(embeddings, dim, normalize=normalize)
