"""Does an exported database answer like the store? Top-k for sampled store vectors vs exact search.

The queries are ``sample`` store rows drawn with a fixed seed; vembed's exact top-k over the store
(:func:`vembed.index.vectors.exact_topk`, shard by shard) is the reference. A hit counts as correct
when its true score reaches the k-th exact score (so equal scores in another order are not errors);
``same_top_k`` means every query's k hits are correct, in score order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from vembed.index.vectors import StoreVectors, exact_topk

TIE = 1e-5  # scores closer than this are ties (float32 sums in another order)


@dataclass
class ExportCheck:
    queries: int
    k: int
    recall: float  # mean fraction of the k hits that belong to the exact top-k
    same_top_k: bool
    max_score_error: float  # largest |database score - exact score| over the hits

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        verdict = (
            "the same top-{k} as exact search"
            if self.same_top_k
            else "recall@{k} {recall:.4f} against exact search"
        )
        return (
            verdict.format(k=self.k, recall=self.recall)
            + f" for {self.queries} sampled queries (score error ≤ {self.max_score_error:.1e})"
        )


def check_export(
    store_dir, search: Callable[[np.ndarray, int], list[list[tuple[int, float]]]], *, sample: int = 20,
    k: int = 10, seed: int = 0,
) -> ExportCheck:  # fmt: skip
    """Compare ``search(queries [n, D], k) -> [[(store row, score), ...] per query]`` with exact search."""
    vectors = StoreVectors(store_dir)
    n = len(vectors)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    queries = vectors[rows]
    exact_scores, _ = exact_topk(store_dir, queries, k)
    answers = search(queries, k)
    recalls, same, error = [], True, 0.0
    for q, hits in enumerate(answers):
        kth = float(exact_scores[q, -1])
        ids = np.array([h[0] for h in hits], dtype=np.int64)
        true = vectors[ids] @ queries[q] if len(ids) else np.empty(0, np.float32)
        good = int(np.sum(true >= kth - TIE))
        recalls.append(min(good, k) / k)
        ordered = len(hits) == k and np.allclose(np.sort(true)[::-1], exact_scores[q].numpy(), atol=TIE)
        same = same and good >= k and ordered
        if len(hits):
            error = max(error, float(np.max(np.abs(true - np.array([h[1] for h in hits])))))
    return ExportCheck(len(rows), k, float(np.mean(recalls)), bool(same), error)
