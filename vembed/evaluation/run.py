"""Evaluate a model on labelled records: embed, then score with :mod:`vembed.evaluation.retrieval`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vembed.console import log
from vembed.data.records import RecordSet, read_records
from vembed.errors import VembedError
from vembed.evaluation.retrieval import ranking_device, retrieval_metrics
from vembed.inference import embed_records
from vembed.models.embedder import Embedder, truncate_embeddings
from vembed.models.factory import create_embedder
from vembed.models.registry import resolve_spec
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
) -> RetrievalReport:
    """Recall@K (``settings.eval.k``) and MAP@R of ``model`` on labelled records.

    Without ``gallery`` every image queries all the others, itself excluded (the SOP protocol);
    with it, ``query`` images search the ``gallery`` images. ``dims`` also scores each of these
    truncated widths (first N dims, re-normalised) of the same embeddings. ``index`` (a faiss kind:
    hnsw, ivf, ivfpq, flat) takes the neighbours from that index instead, see :mod:`vembed.index.ann_eval`.
    """
    settings = settings or Settings()
    start = time.perf_counter()
    if not isinstance(model, Embedder):
        resolve_spec(model)  # an unknown model name fails before any data is read
    queries = _records(query, settings)
    references = _records(gallery, settings) if gallery is not None else None
    embedder = model if isinstance(model, Embedder) else create_embedder(model, settings.model)
    name = embedder.spec.name if isinstance(model, Embedder) else str(model)

    def embed(records: RecordSet, what: str):
        images = records.images()
        out = embed_records(
            embedder,
            images,
            batch_size=settings.eval.batch_size,
            num_workers=settings.data.num_workers,
            skip_bad=settings.data.skip_bad,
            show_progress=show_progress,
            description=f"embedding {what}",
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
            from vembed.index.ann_eval import ann_retrieval_metrics

            return ann_retrieval_metrics(
                _width(q_emb, dim, embedder),
                q_labels,
                **kwargs,
                kind=index,
                settings=settings.index,
                ks=settings.eval.k,
            )
        return retrieval_metrics(
            _width(q_emb, dim, embedder),
            q_labels,
            **kwargs,
            ks=settings.eval.k,
            chunk_size=settings.eval.chunk_size,
            progress=show_progress and dim is None,
            device=ranking_device(embedder),
        )

    metrics = score(None)
    by_dim = {dim: score(dim) for dim in dims}
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
