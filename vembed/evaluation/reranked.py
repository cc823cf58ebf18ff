"""``vembed eval retrieval --rerank R --top-n N``: the metric loop's neighbours, their first N re-scored.

:class:`RerankedNeighbours` wraps a neighbour source of :func:`vembed.evaluation.retrieval.ranked_metrics`:
each chunk's shortlist (at least N long) has its first N re-ordered by :meth:`vembed.rerank.Reranker.rerank`
(blend of the pairwise probability and the embedding similarity); everything after N, and the ranks
of queries with no relevant reference in the shortlist, are the embedding's own. Recall@K and MAP@R of
the wrapped source are then the re-ranked figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vembed.data.records import ImageRecord
from vembed.rerank import Reranker


@dataclass
class EvalRerank:
    """What re-ranking one evaluation needs: the re-ranker, the records behind the embedding rows."""

    reranker: Reranker
    top_n: int
    queries: torch.Tensor  # [Q, D] the query embeddings (rows of the metric loop)
    references: torch.Tensor  # [R, D]
    query_records: Sequence[ImageRecord]
    reference_records: Sequence[ImageRecord]
    all_vs_all: bool = True  # queries search each other (themselves excluded)
    batch_size: int = 64
    num_workers: int = 2
    problems: list[str] = field(default_factory=list)

    def wrap(self, source) -> RerankedNeighbours:
        return RerankedNeighbours(source, self)

    def reorder(self, rows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``candidates`` (``[c, k]`` reference indices of queries ``rows``) with their first N re-ranked."""
        n = min(self.top_n, candidates.shape[1])
        head = candidates[:, :n].cpu()
        rows = rows.cpu()
        valid = head >= 0
        picked = self.references[head.clamp(min=0)]  # [c, n, D]
        sims = (picked * self.queries[rows][:, None, :]).sum(-1).masked_fill(~valid, float("-inf"))
        out, _scores, problems = self.reranker.rerank(
            [self.query_records[i] for i in rows.tolist()],
            self.reference_records,
            head,
            sims,
            top_n=n,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )
        self.problems += problems
        result = candidates.clone()
        result[:, :n] = out.to(candidates.device)
        return result


class RerankedNeighbours:
    """A :class:`~vembed.evaluation.retrieval.NeighbourSource` whose shortlists' first N are re-ranked."""

    def __init__(self, inner, rerank: EvalRerank):
        self.inner, self.rerank = inner, rerank
        self.exhaustive = inner.exhaustive
        self.available = len(rerank.references) - int(rerank.all_vs_all)

    def plan(self, used: torch.Tensor, chunk_size: int) -> list[tuple[int, int]]:
        return self.inner.plan(used, chunk_size)

    def shortlist(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        # at least N long, so that a query missing it has no relevant reference in its first N either
        wide = min(max(k, self.rerank.top_n), self.available)
        return self.rerank.reorder(rows, self.inner.shortlist(rows, wide))

    def first_relevant_rank(self, missed: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.inner.first_relevant_rank(missed, codes)
