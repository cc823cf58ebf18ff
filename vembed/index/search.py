"""Search a store: exact top-k by chunked matrix product, or a faiss index for large stores.

Exact search calls :func:`vembed.neighbours.topk`, the one place vembed ranks neighbours.
``index.kind`` picks the method: ``auto`` uses the index saved in the store if there is one, builds an
HNSW index (and saves it) when the store holds more than ``index.faiss_threshold`` vectors, and
searches exactly otherwise; ``exact``/``flat``/``hnsw``/``ivf``/``ivfpq`` force one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vembed.console import log
from vembed.errors import VembedError
from vembed.index.faiss_index import FaissIndex, build_index, load_index, save_index
from vembed.index.store import EmbeddingStore, embedder_for_store
from vembed.inference import embed_options, embed_records
from vembed.neighbours import topk
from vembed.settings import IndexSettings, Settings


@dataclass
class Query:
    """One query: an image path, or an embedding computed elsewhere (``vembed embed --jsonl``)."""

    name: str  # as the user gave it; the "query" field of the results
    path: Path | None = None
    label: Any = None
    embedding: torch.Tensor | None = None  # [D], when given precomputed


@dataclass
class Hit:
    rank: int  # 1 = best
    index: int  # row in the store
    path: str
    label: Any
    score: float
    rerank_score: float | None = None  # --rerank: the blended score of a re-scored hit


@dataclass
class QueryResult:
    query: Query
    hits: list[Hit]

    def to_rows(self) -> list[dict[str, Any]]:
        """JSON lines: ``{"query", "rank", "path", "label", "score"}`` per hit (``rerank_score`` too for
        the hits ``--rerank`` re-scored)."""
        rows = []
        for h in self.hits:
            row = {
                "query": self.query.name,
                "rank": h.rank,
                "path": h.path,
                "label": h.label,
                "score": h.score,
            }
            if h.rerank_score is not None:
                row["rerank_score"] = h.rerank_score
            rows.append(row)
        return rows


@dataclass
class SearchReport:
    results: list[QueryResult]
    method: str  # exact, flat, hnsw, ivf or ivfpq
    problems: list[str] = field(default_factory=list)  # query images skipped (skip_bad)


def search(
    store: EmbeddingStore,
    queries,
    k: int,
    settings: IndexSettings | None = None,
    *,
    show_progress: bool = False,
    index: FaissIndex | None | str = "choose",
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Top-``k`` store rows for each query embedding: ``(scores, indices, method)``, best first.

    ``scores``/``indices`` are ``[Nq, k]`` (``k`` clipped to the store size); an approximate index
    may find fewer than ``k`` neighbours for a query, marked by index ``-1``. ``index``: the one
    :func:`choose_index` picks (default), or one it picked before (``None``: exact), for a caller that
    searches many times (``vembed serve``).
    """
    settings = settings or IndexSettings()
    queries = torch.as_tensor(queries, dtype=torch.float32)
    if queries.ndim != 2 or queries.shape[1] != store.dim:
        raise VembedError(
            f"query embeddings have shape {tuple(queries.shape)}; the store holds {store.dim}-d"
        )
    k = min(k, len(store))
    if isinstance(index, str):
        index = choose_index(store, settings)
    if index is None:
        scores, indices = topk(
            queries, store.embeddings, k, chunk_size=settings.chunk_size, progress=show_progress
        )
        return scores, indices, "exact"
    scores, indices = index.search(queries.numpy(), k, settings, vectors=store.embeddings)
    return torch.from_numpy(scores), torch.from_numpy(indices).long(), index.kind


def choose_index(store: EmbeddingStore, settings: IndexSettings) -> FaissIndex | None:
    """The faiss index to search with, or ``None`` for exact search (see the module docstring)."""
    kind = settings.kind
    if kind == "exact":
        return None
    saved = (
        load_index(store.path, count=len(store), dim=store.dim, mmap=settings.mmap)
        if store.path is not None
        else None
    )
    if kind == "auto":
        if saved is not None:
            return saved
        if len(store) <= settings.faiss_threshold:
            return None
        kind = "hnsw"
        log(f"store holds {len(store)} vectors (> index.faiss_threshold={settings.faiss_threshold}): HNSW")
    elif saved is not None and saved.kind == kind:
        return saved
    index = build_index(store.embeddings, kind, settings)
    if store.path is not None:
        try:
            save_index(index, store.path)
            log(f"saved the {kind} index in {store.path} for later searches")
        except OSError as exc:
            log(
                f"[yellow]warning:[/] cannot save the index in {store.path} ({exc}); it is used for this search only"
            )
    return index


def search_queries(
    store: EmbeddingStore,
    queries: list[Query],
    settings: Settings | None = None,
    *,
    k: int | None = None,
    exclude_self: bool = False,
    show_progress: bool = True,
) -> SearchReport:
    """Embed the query images with the store's own model, then search; see :func:`search`.

    ``exclude_self`` drops hits whose path is the query image itself (querying a store's own images).
    With ``settings.data.skip_bad`` undecodable query images are skipped and listed in ``problems``.
    """
    settings = settings or Settings()
    k = k or settings.index.k
    if not queries:
        raise VembedError("no queries given")
    vectors: list[torch.Tensor | None] = [q.embedding for q in queries]
    for query in queries:
        if query.embedding is not None and query.embedding.shape != (store.dim,):
            raise VembedError(
                f"{query.name}: the query embedding has {query.embedding.numel()} values; "
                f"the store holds {store.dim}-d embeddings"
            )
    problems: list[str] = []
    to_embed = [i for i, q in enumerate(queries) if q.embedding is None]
    if to_embed:
        from vembed.data.records import ImageRecord

        embedder = embedder_for_store(
            store,
            device=settings.model.device,
            dtype=settings.model.dtype,
            attention=settings.model.attention,
        )
        records = [ImageRecord(queries[i].path, queries[i].label, None, queries[i].name) for i in to_embed]
        options = embed_options(settings, batch_size=settings.index.batch_size, show_progress=show_progress)
        out = embed_records(embedder, records, options, description="embedding queries")
        problems = out.problems
        for row, i in enumerate(out.indices):
            vectors[to_embed[i]] = out.embeddings[row]
    kept = [i for i, v in enumerate(vectors) if v is not None]
    if not kept:
        raise VembedError("no query image could be embedded")
    matrix = torch.stack([vectors[i] for i in kept])
    scores, indices, method = search(store, matrix, k + int(exclude_self), settings.index)
    results = []
    store_labels = _labels_by_path(store) if any(q.label is None and q.path for q in queries) else {}
    for row, i in enumerate(kept):
        query = queries[i]
        if query.label is None and query.path is not None:  # an image of the store: its label is known
            query.label = store_labels.get(str(query.path.expanduser().resolve()))
        own = str(query.path.expanduser().resolve()) if exclude_self and query.path is not None else None
        hits = []
        for score, idx in zip(scores[row].tolist(), indices[row].tolist(), strict=True):
            if idx < 0 or len(hits) == k:
                continue
            entry = store.manifest[idx]
            if own is not None and entry["path"] == own:
                continue
            hits.append(Hit(len(hits) + 1, idx, entry["path"], entry.get("label"), round(float(score), 6)))
        results.append(QueryResult(query, hits))
    return SearchReport(results, method, problems)


def _labels_by_path(store: EmbeddingStore) -> dict[str, Any]:
    return {row["path"]: row.get("label") for row in store.manifest if row.get("label") is not None}


def rerank_results(
    report: SearchReport,
    reranker,
    *,
    top_n: int | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    show_progress: bool = False,
) -> SearchReport:
    """Re-rank each query's first ``top_n`` hits (default: the re-ranker's own) with a
    :class:`vembed.rerank.Reranker`; the hits after them keep their places.

    Re-scored hits carry ``rerank_score`` (``w * p + (1 - w) * score``); ``score`` stays the embedding
    similarity. A hit whose image can no longer be read (moved or deleted since it was embedded) keeps
    its similarity as its re-rank score and is named in ``problems``. Each query needs its image: a
    query given as an embedding cannot be re-ranked.
    """
    from vembed.data.records import ImageRecord

    top_n = top_n or reranker.head.top_n
    results = [r for r in report.results if r.hits]
    for result in results:
        if result.query.path is None:
            raise VembedError(
                f"{result.query.name}: --rerank needs the query image, and this query is an embedding"
            )
    if not results:
        return report
    n = min(top_n, max(len(r.hits) for r in results))
    candidates = torch.full((len(results), n), -1, dtype=torch.long)
    sims = torch.full((len(results), n), float("-inf"))
    refs: list[ImageRecord] = []
    for row, result in enumerate(results):
        for col, hit in enumerate(result.hits[:n]):
            candidates[row, col] = len(refs)
            sims[row, col] = hit.score
            refs.append(ImageRecord(Path(hit.path), hit.label, None, hit.path))
    queries = [ImageRecord(r.query.path, r.query.label, None, r.query.name) for r in results]
    order, scores, problems = reranker.rerank(
        queries, refs, candidates, sims, top_n=n, batch_size=batch_size, num_workers=num_workers,
        show_progress=show_progress,
    )  # fmt: skip
    for row, result in enumerate(results):
        m = min(n, len(result.hits))
        by_ref = {candidates[row, col].item(): hit for col, hit in enumerate(result.hits[:m])}
        head = [by_ref[int(i)] for i in order[row, :m].tolist()]
        for hit, score in zip(head, scores[row, :m].tolist(), strict=True):
            hit.rerank_score = round(float(score), 6)
        result.hits = head + result.hits[m:]
        for rank, hit in enumerate(result.hits, 1):
            hit.rank = rank
    report.problems = list(report.problems) + [f"--rerank: {p}" for p in problems]
    return report
