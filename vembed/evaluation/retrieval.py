"""Retrieval metrics (Recall@K, MAP@R): one metric loop fed by a neighbour source.

:func:`ranked_metrics` is the loop: for each chunk of queries it asks a :class:`NeighbourSource` for
their shortlist of references (best first) and, for the queries whose first relevant reference ranks
below it, that reference's rank. The sources:

- :class:`ExactNeighbours`: exact inner-product ranking in this process (:mod:`vembed.neighbours`),
  used by :func:`retrieval_metrics`;
- :class:`~vembed.evaluation.sharded_retrieval.ShardedNeighbours`: the same ranking split across the
  processes of torchrun / accelerate launch;
- :class:`~vembed.evaluation.ann_retrieval.IndexNeighbours`: a faiss index's neighbour lists (not
  exhaustive: Recall@K from the lists, no MAP@R).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from vembed.errors import VembedError
from vembed.neighbours import (
    advancing,
    as_embeddings,
    check_positive_int,
    check_same_dim,
    chunk_bounds,
    scores_buffer,
    select_top,
    similarities,
)

__all__ = [
    "ExactNeighbours",
    "NeighbourSource",
    "labels_to_codes",
    "ranked_metrics",
    "retrieval_metrics",
]

# The metric loop selects at least this many neighbours per query; Recall@K for the queries whose
# first relevant reference ranks lower is counted instead (cheaper than selecting max(ks) for all).
_SHORTLIST = 16


def retrieval_metrics(
    query_embeddings,
    query_labels,
    reference_embeddings=None,
    reference_labels=None,
    *,
    ks: Sequence[int] = (1, 10, 100),
    chunk_size: int = 4096,
    progress: bool = False,
    device: torch.device | str | None = None,
    rerank=None,
) -> dict[str, float]:
    """Recall@K for each K in ``ks`` and MAP@R, by exact inner-product search.

    ``rerank`` (a :class:`vembed.evaluation.reranked.EvalRerank`) re-scores each query's first N
    neighbours with a pairwise re-ranker before the metrics are counted.

    ``device``: where to rank (default: the query embeddings' device); evaluation passes the model's
    GPU, where the similarity products take a fraction of the CPU's time.

    Two protocols:

    - ``reference_embeddings=None``: all-vs-all (SOP, CUB, Cars). Every item queries all the others,
      itself excluded; duplicates of it at other positions still count.
    - otherwise query/gallery (In-shop): queries search the references.

    Recall@K is the fraction of queries with at least one same-label reference among their top K
    (the SOP protocol; K larger than the number of references means all of them). MAP@R follows
    Musgrave et al., "A Metric Learning Reality Check": with R the number of references relevant to
    the query, ``AP@R = (1/R) · Σ_{i≤R} P(i) · [i-th result is relevant]``, averaged over queries.
    Queries with no relevant reference (a class with a single image in all-vs-all, a class missing
    from the gallery) are skipped and counted in ``num_skipped``.

    Labels may be int tensors, numpy arrays or lists of ints or strings; embeddings as in
    :func:`vembed.neighbours.topk`.
    Each chunk of queries ranks only its top ``max(max(ks), largest R in the chunk)`` references, so
    neither the similarity matrix nor the full ranking is ever held.

    Returns:
        ``{"recall@1": ..., "recall@10": ..., "map@r": ..., "num_queries": used, "num_skipped": ...}``
        with the metrics as fractions in [0, 1].

    Raises:
        VembedError: on mismatched shapes or lengths, bad ``ks``, or when no query has a relevant
            reference (the metrics would be undefined).
    """
    ks = check_ks(ks)
    check_positive_int(chunk_size, "chunk_size")
    queries, references = embedding_inputs(query_embeddings, reference_embeddings, reference_labels, device)
    all_vs_all = reference_embeddings is None
    if all_vs_all:
        query_codes = reference_codes = labels_to_codes(query_labels)
    else:
        check_same_dim(queries, "query_embeddings", references, "reference_embeddings")
        query_codes, reference_codes = joint_codes(query_labels, reference_labels)
    check_same_length(queries, "query_embeddings", query_codes, "query_labels")
    check_same_length(references, "reference_embeddings", reference_codes, "reference_labels")
    if len(queries) == 0:
        raise VembedError("query_embeddings is empty: there is nothing to evaluate")
    query_codes = query_codes.to(queries.device)
    reference_codes = reference_codes.to(queries.device)
    source = ExactNeighbours(queries, references, reference_codes, int(query_codes.max()) + 1, all_vs_all)
    if rerank is not None:
        source = rerank.wrap(source)
    return ranked_metrics(
        source, query_codes, reference_codes, all_vs_all=all_vs_all, ks=ks, chunk_size=chunk_size,
        progress=progress,
    )  # fmt: skip


class NeighbourSource(Protocol):
    """Where :func:`ranked_metrics` takes each chunk of queries' neighbours from.

    ``exhaustive``: the source ranks every reference, so it can rank a relevant reference below the
    shortlist (exact Recall@K for any K, and MAP@R); a faiss index cannot (Recall@K from its lists).
    """

    exhaustive: bool

    def plan(self, used: torch.Tensor, chunk_size: int) -> list[tuple[int, int]]:
        """``(start, stop)`` chunks of positions in ``used`` (the scored queries' global indices)."""

    def shortlist(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        """``[len(rows), <= k]`` global reference indices, best first, equal scores by lower index
        (``-1`` where a non-exhaustive source found fewer)."""

    def first_relevant_rank(self, missed: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """1-based global rank of the first relevant reference of the last shortlist's rows at
        positions ``missed`` (none of them in the shortlist), whose labels are ``codes``."""


def ranked_metrics(
    source: NeighbourSource,
    query_codes: torch.Tensor,
    reference_codes: torch.Tensor,
    *,
    all_vs_all: bool,
    ks: Sequence[int],
    chunk_size: int = 4096,
    progress: bool = False,
    rows: torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall@K (and MAP@R when the source is exhaustive) of the queries (all, or those at ``rows``)
    from ``source``'s neighbours; ``query_codes`` / ``reference_codes`` are global label codes."""
    class_sizes = torch.bincount(reference_codes, minlength=int(query_codes.max()) + 1)
    num_relevant = class_sizes[query_codes] - int(all_vs_all)
    if rows is None:
        used = torch.nonzero(num_relevant > 0).squeeze(1)
        num_skipped = len(query_codes) - len(used)
    else:
        rows = rows.to(query_codes.device)
        used = rows[num_relevant[rows] > 0]
        num_skipped = len(rows) - len(used)
    if len(used) == 0:
        why = "every class has a single item" if all_vs_all else "no query label occurs among the references"
        raise VembedError(f"no query has a relevant reference ({why}); Recall@K and MAP@R are undefined")

    available = len(reference_codes) - int(all_vs_all)
    hits = dict.fromkeys(ks, 0)
    average_precision = torch.empty(len(used), dtype=torch.float64)  # AP@R per used query
    for start, stop in advancing(source.plan(used, chunk_size), progress, "retrieval"):
        chunk = used[start:stop]
        r = num_relevant[chunk]
        # The top R (for MAP@R; at least _SHORTLIST) is selected; Recall@K needs only the rank of the
        # first relevant reference: read off the shortlist, or counted for the rows that miss it.
        neighbours = source.shortlist(chunk, min(max(int(r.max()), _SHORTLIST), available))
        relevant = reference_codes[neighbours] == query_codes[chunk, None]  # [c, k] bool
        if not source.exhaustive:
            relevant &= neighbours >= 0
        first = first_relevant(relevant)
        if source.exhaustive:
            missed = torch.nonzero(first == 0).squeeze(1)
            if len(missed):
                first[missed] = source.first_relevant_rank(missed, query_codes[chunk[missed]])
            average_precision[start:stop] = average_precision_at_r(relevant, r).cpu()
        for kk in ks:
            hits[kk] += int(((first > 0) & (first <= kk)).sum())

    metrics: dict[str, float] = {f"recall@{kk}": hits[kk] / len(used) for kk in ks}
    if source.exhaustive:
        metrics["map@r"] = float(average_precision.mean())
    metrics["num_queries"] = len(used)
    metrics["num_skipped"] = num_skipped
    return metrics


class ExactNeighbours:
    """Exact ranking in this process: each chunk's similarities to every reference (kept for the
    ranks beyond the shortlist). ``reference_codes`` on the embeddings' device."""

    exhaustive = True

    def __init__(self, queries, references, reference_codes, num_classes: int, all_vs_all: bool):
        self.queries, self.references, self.all_vs_all = queries, references, all_vs_all
        self.members = ClassMembers(reference_codes, torch.bincount(reference_codes, minlength=num_classes))
        self.scores = None

    def plan(self, used: torch.Tensor, chunk_size: int) -> list[tuple[int, int]]:
        self.buffer = scores_buffer(len(used), self.references, chunk_size)
        return chunk_bounds(len(used), chunk_size)

    def shortlist(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        exclude = rows if self.all_vs_all else None
        self.scores = similarities(self.queries[rows], self.references, exclude, self.buffer[: len(rows)])
        return select_top(self.scores, k, exclude is not None)[1]

    def first_relevant_rank(self, missed: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.members.first_relevant_rank(self.scores[missed], codes)


def first_relevant(relevant: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's first relevant neighbour in a ``[c, k]`` bool shortlist; 0 if none.

    Recall@K needs only this rank: a row that misses the shortlist gets it from
    :meth:`ClassMembers.first_relevant_rank` (cheaper than selecting ``max(ks)`` for every row).
    """
    first = relevant.to(torch.uint8).argmax(dim=1) + 1
    return first.masked_fill_(~relevant.any(dim=1), 0)


def average_precision_at_r(relevant: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """AP@R of each row of a ``[c, k]`` bool ranking (``k`` ≥ the row's ``R``), in float64."""
    ranks = torch.arange(1, relevant.shape[1] + 1, device=relevant.device)
    precision = relevant.cumsum(dim=1) / ranks
    counted = relevant & (ranks <= r[:, None])
    return (precision * counted).sum(dim=1, dtype=torch.float64) / r


def labels_to_codes(labels) -> torch.Tensor:
    """Class labels (ints or strings; tensor, numpy array or list) → int64 codes ``0..C-1``.

    Codes follow the sorted order of the distinct labels, so equal labels get equal codes.
    """
    _, codes = np.unique(as_labels(labels, "labels"), return_inverse=True)
    return torch.from_numpy(codes.reshape(-1).astype(np.int64))


class ClassMembers:
    """References grouped by class, to find each query's best relevant reference by gathering."""

    def __init__(self, reference_codes: torch.Tensor, class_sizes: torch.Tensor):
        self.codes = reference_codes
        self.order = torch.argsort(reference_codes, stable=True)  # reference indices, class by class
        self.sizes = class_sizes
        self.starts = torch.cumsum(class_sizes, 0) - class_sizes

    def first_relevant_rank(self, scores: torch.Tensor, query_codes: torch.Tensor) -> torch.Tensor:
        """1-based rank of each row's first same-class reference in :func:`~vembed.neighbours.select_top`'s order.

        Rank = 1 + references scoring higher + references with the same score and a lower index than
        the best relevant one (ties rank by index), the query itself excluded (its score is -inf).
        Every row must have a relevant reference besides itself.
        """
        best, first = self.best_relevant(scores, query_codes)
        return 1 + ranked_before(scores, best, first)

    def best_relevant(
        self, scores: torch.Tensor, query_codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's best same-class score and the lowest reference index with it, as ``[c, 1]``
        columns; ``-inf`` and ``len(codes)`` for a row whose class has no reference here."""
        size = self.sizes[query_codes]
        width = int(size.max()) if len(size) else 0
        if width == 0:
            best = torch.full((len(scores), 1), float("-inf"), device=scores.device)
            return best, torch.full_like(best, len(self.codes), dtype=torch.int64)
        offsets = torch.arange(width, device=scores.device)
        valid = offsets < size[:, None]
        slots = (self.starts[query_codes, None] + offsets).clamp_(max=len(self.order) - 1)
        members = self.order[slots]  # [c, largest class] reference indices
        member_scores = scores.gather(1, members).masked_fill_(~valid, float("-inf"))
        best = member_scores.max(dim=1, keepdim=True).values
        at_best = valid & (member_scores == best)
        first = torch.where(at_best, members, len(self.codes)).min(dim=1, keepdim=True).values
        return best, first


def ranked_before(scores: torch.Tensor, best: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """How many columns of each row rank before reference ``first`` scoring ``best`` (``[c, 1]``
    each): a higher score, or the same score and a lower index."""
    before = (scores > best).sum(dim=1, dtype=torch.int64)
    tied = (scores == best).any(dim=1)  # rows with a column at exactly the best score
    if tied.any():
        rows = torch.nonzero(tied).squeeze(1)
        columns = torch.arange(scores.shape[1], device=scores.device)
        before[rows] += ((scores[rows] == best[rows]) & (columns < first[rows])).sum(dim=1)
    return before


def embedding_inputs(
    query_embeddings, reference_embeddings, reference_labels, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(queries, references)`` as float32 on ``device`` (the same tensor in all-vs-all, i.e. without
    ``reference_embeddings``); references without their labels, or the reverse, are an error."""
    queries = as_embeddings(query_embeddings, "query_embeddings", device=device)
    if reference_embeddings is None:
        if reference_labels is not None:
            raise VembedError("reference_labels was given without reference_embeddings")
        return queries, queries
    if reference_labels is None:
        raise VembedError("reference_embeddings was given without reference_labels")
    return queries, as_embeddings(reference_embeddings, "reference_embeddings", device=queries.device)


def as_labels(labels, name: str) -> np.ndarray:
    """A 1-D numpy array of integer or string labels."""
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex():
            raise VembedError(f"{name} must be integers or strings, got a {labels.dtype} tensor")
        labels = labels.detach().cpu().numpy()
    elif not isinstance(labels, np.ndarray):
        values = list(labels)
        if all(isinstance(v, str) for v in values):
            labels = np.array(values, dtype=str)
        elif all(isinstance(v, (int, np.integer)) for v in values):
            labels = np.array(values, dtype=np.int64)
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise VembedError(f"{name} must be all ints or all strings, got a mix of {', '.join(kinds)}")
    if labels.dtype.kind == "O" and all(isinstance(v, str) for v in labels.ravel()):
        labels = labels.astype(str)
    if labels.dtype.kind not in "iubUS":
        raise VembedError(f"{name} must be integers or strings, got dtype {labels.dtype}")
    if labels.ndim != 1:
        raise VembedError(f"{name} must be 1-D (one label per item), got shape {labels.shape}")
    return labels


def joint_codes(query_labels, reference_labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes for query and reference labels from one shared mapping."""
    queries = as_labels(query_labels, "query_labels")
    references = as_labels(reference_labels, "reference_labels")
    if (queries.dtype.kind in "US") != (references.dtype.kind in "US"):
        kinds = ["strings" if a.dtype.kind in "US" else "integers" for a in (queries, references)]
        raise VembedError(
            f"query_labels are {kinds[0]} but reference_labels are {kinds[1]}; they must be the same kind"
        )
    codes = labels_to_codes(np.concatenate([queries, references]))
    return codes[: len(queries)], codes[len(queries) :]


def check_same_length(embeddings: torch.Tensor, e_name: str, codes: torch.Tensor, l_name: str) -> None:
    if len(embeddings) != len(codes):
        raise VembedError(f"{e_name} has {len(embeddings)} rows but {l_name} has {len(codes)} labels")


def check_ks(ks: Sequence[int]) -> list[int]:
    """Distinct positive ks in increasing order."""
    ks = [ks] if isinstance(ks, int) else list(ks)
    if not ks:
        raise VembedError("ks is empty: give at least one K for Recall@K")
    for k in ks:
        check_positive_int(k, "every K in ks")
    return sorted({int(k) for k in ks})
