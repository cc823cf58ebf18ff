"""Retrieval metrics with neighbours from a faiss index (``vembed eval retrieval --index KIND``).

For sets too large to rank exactly: :class:`IndexNeighbours` feeds the index's neighbour lists to the
metric loop (:func:`vembed.evaluation.retrieval.ranked_metrics`), so Recall@K comes from them (MAP@R,
which needs every relevant item ranked, is left out); a sample of queries is also scored with exact
neighbours to report what the index costs: ``recall_loss@K`` (exact Recall@K minus the index's, on
the sample) and ``neighbour_recall@10`` (the share of the exact top-10 neighbours the index finds).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vembed.errors import VembedError
from vembed.evaluation.retrieval import ExactNeighbours, joint_codes, labels_to_codes, ranked_metrics
from vembed.index.faiss_index import FaissIndex, build_index
from vembed.neighbours import as_embeddings, topk
from vembed.settings import IndexSettings


def ann_retrieval_metrics(
    query_embeddings,
    query_labels,
    reference_embeddings=None,
    reference_labels=None,
    *,
    kind: str = "hnsw",
    settings: IndexSettings | None = None,
    ks: Sequence[int] = (1, 10, 100),
    sample: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Recall@K (all-vs-all without ``reference_embeddings``, else query/gallery) by a ``kind`` index,
    plus ``recall_loss@K`` and ``neighbour_recall@10`` against exact search on ``sample`` queries."""
    settings = settings or IndexSettings()
    ks = sorted(set(ks))
    queries = as_embeddings(query_embeddings, "query_embeddings")
    all_vs_all = reference_embeddings is None
    if all_vs_all:
        references = queries
        query_codes = reference_codes = labels_to_codes(query_labels)
    else:
        references = as_embeddings(reference_embeddings, "reference_embeddings")
        query_codes, reference_codes = joint_codes(query_labels, reference_labels)
    depth = min(max(ks[-1], 10), len(references) - int(all_vs_all))
    if depth < 1:
        raise VembedError("retrieval needs at least two items")
    index = build_index(references, kind, settings, show_progress=False)
    found = IndexNeighbours(index, queries, references, depth, all_vs_all, settings)
    score = dict(all_vs_all=all_vs_all, ks=ks)
    metrics = ranked_metrics(found, query_codes, reference_codes, **score)

    class_sizes = torch.bincount(reference_codes, minlength=int(query_codes.max()) + 1)
    used = torch.nonzero(class_sizes[query_codes] - int(all_vs_all) > 0).squeeze(1)
    rng = np.random.default_rng(seed)
    rows = used[torch.from_numpy(np.sort(rng.choice(len(used), min(sample, len(used)), replace=False)))]
    exact = ExactNeighbours(queries, references, reference_codes, len(class_sizes), all_vs_all)
    exact_sample = ranked_metrics(exact, query_codes, reference_codes, rows=rows, **score)
    index_sample = ranked_metrics(found, query_codes, reference_codes, rows=rows, **score)
    for k in ks:
        metrics[f"recall_loss@{k}"] = exact_sample[f"recall@{k}"] - index_sample[f"recall@{k}"]
    ten = min(10, depth)
    _, top = topk(queries[rows], references, ten + int(all_vs_all))
    top = _without_self(top.numpy(), rows.numpy() if all_vs_all else None, ten)
    overlap = [
        len(set(a[:ten]) & set(b[:ten]))
        for a, b in zip(found.shortlist(rows, ten).tolist(), top.tolist(), strict=True)
    ]
    metrics["neighbour_recall@10"] = float(np.sum(overlap) / (len(rows) * ten))
    return metrics


class IndexNeighbours:
    """A faiss index's ``depth`` nearest references of each query (the query itself left out in
    all-vs-all); not exhaustive: a relevant reference beyond ``depth`` is not found."""

    exhaustive = False

    def __init__(self, index: FaissIndex, queries, references, depth: int, all_vs_all: bool, settings):
        self.index, self.queries, self.references = index, queries, references
        self.depth, self.all_vs_all, self.settings = depth, all_vs_all, settings

    def plan(self, used: torch.Tensor, chunk_size: int) -> list[tuple[int, int]]:
        return [(start, min(start + chunk_size, len(used))) for start in range(0, len(used), chunk_size)]

    def shortlist(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        """``[len(rows), depth]`` reference indices, best first (``-1`` where the index found fewer)."""
        _, found = self.index.search(
            self.queries[rows].numpy(),
            self.depth + int(self.all_vs_all),
            self.settings,
            vectors=self.references,
        )
        found = _without_self(found, rows.numpy() if self.all_vs_all else None, self.depth)
        return torch.from_numpy(np.ascontiguousarray(found))

    def first_relevant_rank(self, missed: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("an index ranks only its shortlist")


def _without_self(found: np.ndarray, rows: np.ndarray | None, depth: int) -> np.ndarray:
    """Each row's neighbours without the query itself (all-vs-all), cut to ``depth``."""
    if rows is None:
        return found[:, :depth]
    own = found == rows[:, None]
    drop_last = ~own.any(axis=1, keepdims=True) & (np.arange(found.shape[1]) == found.shape[1] - 1)
    return found[~(own | drop_last)].reshape(len(found), -1)[:, :depth]
