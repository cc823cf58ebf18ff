"""Evaluate a model on labelled records: embed, then score with :mod:`vembed.evaluation.retrieval`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vembed.console import log
from vembed.data.records import RecordSet, read_records
from vembed.errors import VembedError
from vembed.evaluation.retrieval import retrieval_metrics
from vembed.evaluation.sharded_retrieval import sharded_retrieval_metrics
from vembed.inference import embed_records
from vembed.models.embedder import Embedder, truncate_embeddings
from vembed.models.factory import create_embedder
from vembed.models.loader import resolve_ref
from vembed.neighbours import ranking_device
from vembed.processes import Processes, device_for
from vembed.settings import Settings


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
        return out

    def by_width(self) -> list[RetrievalReport]:
        """This report first, then one per ``--dims`` width (named ``model @ N-d``), for tables."""
        return [self] + [
            RetrievalReport(f"{self.model} @ {d}-d", self.data, m, self.protocol, self.gallery)
            for d, m in self.dims.items()
        ]


def evaluate_retrieval(
    model: str | Path | Embedder,
    query: str | Path | RecordSet,
    *,
    gallery: str | Path | RecordSet | None = None,
    settings: Settings | None = None,
    show_progress: bool = True,
    dims: Sequence[int] = (),
    index: str | None = None,
    processes: Processes | None = None,
) -> RetrievalReport:
    """Recall@K (``settings.eval.k``) and MAP@R of ``model`` on labelled records.

    Without ``gallery`` every image queries all the others, itself excluded (the SOP protocol);
    with it, ``query`` images search the ``gallery`` images. ``dims`` also scores each of these
    truncated widths (first N dims, re-normalised) of the same embeddings. ``index`` (a faiss kind:
    hnsw, ivf, ivfpq, flat) takes the neighbours from that index instead, see :mod:`vembed.evaluation.ann_retrieval`.

    ``processes`` (started by torchrun / accelerate launch, see :mod:`vembed.processes`): each
    process embeds a contiguous share of the images on its own device and holds only those embeddings;
    ranking is split across the processes (:mod:`vembed.evaluation.sharded_retrieval`) and every
    process returns the report of the whole set.
    """
    settings = settings or Settings()
    procs = processes or Processes()
    start = time.perf_counter()
    if procs.world_size > 1 and index is not None:
        raise VembedError("--index ranks in one process; run it without torchrun / accelerate launch")
    if not isinstance(model, Embedder):
        resolve_ref(model)  # an unknown model name fails before any data is read
    queries = _records(query, settings)
    references = _records(gallery, settings) if gallery is not None else None
    if isinstance(model, Embedder):
        embedder = model
    else:
        device = device_for(settings.model.device, procs.local_rank, procs.world_size)
        embedder = create_embedder(model, settings.model.model_copy(update={"device": device}))
    name = embedder.spec.name if isinstance(model, Embedder) else str(model)

    def embed(records: RecordSet, what: str):
        images = _share(records.images(), procs)
        out = embed_records(
            embedder,
            images,
            batch_size=settings.eval.batch_size,
            num_workers=settings.data.num_workers,
            skip_bad=settings.data.skip_bad,
            show_progress=show_progress and procs.rank == 0,
            description=f"embedding {what}"
            + (f" (process 0's share of {procs.world_size})" if procs.world_size > 1 else ""),
        )
        return out.embeddings, [images[i].label for i in out.indices], out.problems

    q_emb, q_labels, problems = embed(queries, "queries")
    r_emb = r_labels = None
    if references is not None:
        r_emb, r_labels, r_problems = embed(references, "gallery")
        problems = problems + r_problems

    def score(dim: int | None) -> dict[str, float]:
        kwargs = {}
        if r_emb is not None:
            kwargs = {"reference_embeddings": _width(r_emb, dim, embedder), "reference_labels": r_labels}
        if index is not None:
            from vembed.evaluation.ann_retrieval import ann_retrieval_metrics

            return ann_retrieval_metrics(
                _width(q_emb, dim, embedder),
                q_labels,
                **kwargs,
                kind=index,
                settings=settings.index,
                ks=settings.eval.k,
            )
        rank = retrieval_metrics if procs.world_size == 1 else sharded_retrieval_metrics
        return rank(
            _width(q_emb, dim, embedder),
            q_labels,
            **kwargs,
            ks=settings.eval.k,
            chunk_size=settings.eval.chunk_size,
            progress=show_progress and dim is None and procs.rank == 0,
            device=ranking_device(embedder),
        )

    metrics = score(None)
    by_dim = {dim: score(dim) for dim in dims}
    if procs.world_size > 1:  # every process reports the problems of the whole set
        problems = [p for part in procs.gather(problems) for p in part]
    if problems:
        log(f"[yellow]skipped {len(problems)} bad image(s)[/]; first: {problems[0]}")
    return RetrievalReport(
        model=name,
        data=_name(query),
        gallery=_name(gallery) if gallery is not None else None,
        protocol="query/gallery" if references is not None else "all-vs-all",
        metrics=metrics,
        seconds=time.perf_counter() - start,
        problems=problems,
        dims=by_dim,
    )


def _share(images: list, procs: Processes) -> list:
    """This process' contiguous share of ``images`` (all of them when alone)."""
    size, extra = divmod(len(images), procs.world_size)
    start = procs.rank * size + min(procs.rank, extra)
    return images[start : start + size + (procs.rank < extra)]


def _width(embeddings, dim: int | None, embedder: Embedder):
    """The embeddings at a ``--dims`` width (None: as they are)."""
    if dim is None:
        return embeddings
    if dim > embeddings.shape[1]:
        raise VembedError(f"--dims {dim} is wider than the model's {embeddings.shape[1]}-d embeddings")
    return truncate_embeddings(embeddings, dim, normalize=embedder.normalize)


def _records(source: str | Path | RecordSet, settings: Settings) -> RecordSet:
    if isinstance(source, RecordSet):
        records = source
    else:
        records = read_records(
            source, image_root=settings.data.image_root, skip_bad=settings.data.skip_bad, require_label=True
        )
    if records.problems:
        log(f"[yellow]skipped {len(records.problems)} bad record(s)[/]; first: {records.problems[0]}")
    if not records.records:
        raise VembedError(f"{records.path}: no usable records")
    return records


def _name(source) -> str:
    return str(source.path) if isinstance(source, RecordSet) else str(source)
