"""Retrieval metrics with neighbours from a faiss index (``vembed eval retrieval --index KIND``).

For sets too large to rank exactly: Recall@K comes from the index's neighbour lists (MAP@R, which
needs every relevant item ranked, is left out), and a sample of queries is also ranked exactly by
:func:`vembed.evaluation.retrieval.topk` to report what the index costs: ``recall_loss@K`` (exact
Recall@K minus the index's, on the sample) and ``neighbour_recall@10`` (the share of the exact top-10
neighbours the index finds).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vembed.errors import VembedError
from vembed.evaluation.retrieval import labels_to_codes, topk
from vembed.index.faiss_index import build_index
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
    queries = torch.as_tensor(query_embeddings, dtype=torch.float32)
    all_vs_all = reference_embeddings is None
    references = queries if all_vs_all else torch.as_tensor(reference_embeddings, dtype=torch.float32)
    ref_labels = query_labels if all_vs_all else reference_labels
    codes = labels_to_codes([*list(query_labels), *([] if all_vs_all else list(ref_labels))])
    query_codes = codes[: len(queries)].numpy()
    ref_codes = query_codes if all_vs_all else codes[len(queries) :].numpy()
    depth = min(max(ks[-1], 10), len(references) - int(all_vs_all))
    if depth < 1:
        raise VembedError("retrieval needs at least two items")
    sizes = np.bincount(ref_codes, minlength=int(codes.max()) + 1)
    used = np.nonzero(sizes[query_codes] - int(all_vs_all) > 0)[0]
    if len(used) == 0:
        raise VembedError("no query has a relevant reference; Recall@K is undefined")

    index = build_index(references, kind, settings, show_progress=False)
    _, found = index.search(queries[used].numpy(), depth + int(all_vs_all), settings, vectors=references)
    found = _without_self(found, used if all_vs_all else None, depth)
    metrics = {f"recall@{k}": _recall(found, query_codes[used], ref_codes, k) for k in ks}
    metrics["num_queries"] = len(used)
    metrics["num_skipped"] = len(queries) - len(used)

    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(used), min(sample, len(used)), replace=False))
    rows = used[picked]
    _, exact = topk(queries[rows], references, depth + int(all_vs_all))
    exact = _without_self(exact.numpy(), rows if all_vs_all else None, depth)
    for k in ks:
        lost = _recall(exact, query_codes[rows], ref_codes, k) - _recall(
            found[picked], query_codes[rows], ref_codes, k
        )
        metrics[f"recall_loss@{k}"] = lost
    ten = min(10, depth)
    overlap = [
        len(set(a[:ten]) & set(b[:ten])) for a, b in zip(found[picked].tolist(), exact.tolist(), strict=True)
    ]
    metrics["neighbour_recall@10"] = float(np.sum(overlap) / (len(rows) * ten))
    return metrics


def _without_self(found: np.ndarray, rows: np.ndarray | None, depth: int) -> np.ndarray:
    """Each row's neighbours without the query itself (all-vs-all), cut to ``depth``."""
    if rows is None:
        return found[:, :depth]
    own = found == rows[:, None]
    drop_last = ~own.any(axis=1, keepdims=True) & (np.arange(found.shape[1]) == found.shape[1] - 1)
    return found[~(own | drop_last)].reshape(len(found), -1)[:, :depth]


def _recall(found: np.ndarray, query_codes: np.ndarray, ref_codes: np.ndarray, k: int) -> float:
    hits = np.where(found[:, :k] >= 0, ref_codes[np.maximum(found[:, :k], 0)], -1) == query_codes[:, None]
    return float(hits.any(axis=1).mean())
