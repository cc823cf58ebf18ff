"""Exact nearest-neighbour ranking and the retrieval metrics built on it (Recall@K, MAP@R).

This is the one place in vembed that ranks neighbours: train-time validation, evaluation and search
all call :func:`topk` or :func:`retrieval_metrics`, whose pieces
:mod:`vembed.evaluation.sharded_retrieval` reuses to split the same ranking across processes.

Scores are inner products computed in float32 (cosine similarity for L2-normalised embeddings).
Queries are ranked ``chunk_size`` rows at a time, so memory grows with ``chunk_size × N_references``
and the full ``N_queries × N_references`` similarity matrix is never held (SOP all-vs-all is 60k × 60k).
Equal scores are ordered by reference index, lower first, so results do not depend on the chunking.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from vembed.console import progress as progress_bar
from vembed.errors import VembedError

__all__ = ["labels_to_codes", "ranking_device", "retrieval_metrics", "topk"]

# Rows of a chunk whose top-k boundary ties are re-selected at once (bounds the int32 cumsum buffer).
_TIE_ROWS = 256
# retrieval_metrics selects at least this many neighbours per query; Recall@K for the queries whose
# first relevant reference ranks lower is counted instead (cheaper than selecting max(ks) for all).
_SHORTLIST = 16


def topk(
    queries: torch.Tensor,
    references: torch.Tensor,
    k: int,
    *,
    chunk_size: int = 4096,
    exclude_self: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` references of each query by inner product, best first.

    Args:
        queries: ``[Nq, D]`` tensor or numpy array (float16, bfloat16 or float32).
        references: ``[Nr, D]`` tensor or numpy array.
        k: neighbours per query; clipped to the number of references available to a query.
        chunk_size: query rows scored at once; memory is about ``chunk_size × Nr × 4`` bytes.
        exclude_self: queries and references are the same set in the same order; query ``i`` never
            returns reference ``i`` (a duplicate of it at another index is still returned).
        progress: show a progress bar on stderr.

    Returns:
        ``(scores, indices)``: ``[Nq, k]`` float32 and int64 CPU tensors, best first; equal scores are
        ordered by reference index, lower first. Computed on the device of ``queries``.
    """
    queries = _as_embeddings(queries, "queries")
    references = _as_embeddings(references, "references", device=queries.device)
    _check_same_dim(queries, "queries", references, "references")
    _check_positive_int(k, "k")
    _check_positive_int(chunk_size, "chunk_size")
    if exclude_self and len(queries) != len(references):
        raise VembedError(
            f"exclude_self=True needs queries and references to be the same set, but there are "
            f"{len(queries)} queries and {len(references)} references"
        )

    k = min(k, len(references) - 1 if exclude_self else len(references))
    scores = torch.empty(len(queries), max(k, 0), dtype=torch.float32)
    indices = torch.empty(len(queries), max(k, 0), dtype=torch.int64)
    if k <= 0:
        return scores, indices
    buffer = _scores_buffer(len(queries), references, chunk_size)
    for start, stop in _chunks(len(queries), chunk_size, progress, "top-k"):
        exclude = torch.arange(start, stop, device=queries.device) if exclude_self else None
        chunk_scores, chunk_indices = _rank(
            queries[start:stop], references, k, exclude, buffer[: stop - start]
        )
        scores[start:stop] = chunk_scores.cpu()
        indices[start:stop] = chunk_indices.cpu()
    return scores, indices


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
) -> dict[str, float]:
    """Recall@K for each K in ``ks`` and MAP@R, by exact inner-product search.

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

    Labels may be int tensors, numpy arrays or lists of ints or strings; embeddings as in :func:`topk`.
    Each chunk of queries ranks only its top ``max(max(ks), largest R in the chunk)`` references, so
    neither the similarity matrix nor the full ranking is ever held.

    Returns:
        ``{"recall@1": ..., "recall@10": ..., "map@r": ..., "num_queries": used, "num_skipped": ...}``
        with the metrics as fractions in [0, 1].

    Raises:
        VembedError: on mismatched shapes or lengths, bad ``ks``, or when no query has a relevant
            reference (the metrics would be undefined).
    """
    ks = _check_ks(ks)
    _check_positive_int(chunk_size, "chunk_size")
    queries = _as_embeddings(query_embeddings, "query_embeddings", device=device)
    all_vs_all = reference_embeddings is None
    if all_vs_all:
        if reference_labels is not None:
            raise VembedError("reference_labels was given without reference_embeddings")
        references = queries
        query_codes = reference_codes = labels_to_codes(query_labels)
    else:
        if reference_labels is None:
            raise VembedError("reference_embeddings was given without reference_labels")
        references = _as_embeddings(reference_embeddings, "reference_embeddings", device=queries.device)
        _check_same_dim(queries, "query_embeddings", references, "reference_embeddings")
        query_codes, reference_codes = _joint_codes(query_labels, reference_labels)
    _check_same_length(queries, "query_embeddings", query_codes, "query_labels")
    _check_same_length(references, "reference_embeddings", reference_codes, "reference_labels")
    if len(queries) == 0:
        raise VembedError("query_embeddings is empty: there is nothing to evaluate")

    query_codes = query_codes.to(queries.device)
    reference_codes = reference_codes.to(queries.device)
    class_sizes = torch.bincount(reference_codes, minlength=int(query_codes.max()) + 1)
    num_relevant = class_sizes[query_codes] - int(all_vs_all)
    used = torch.nonzero(num_relevant > 0).squeeze(1)
    num_skipped = len(queries) - len(used)
    if len(used) == 0:
        why = "every class has a single item" if all_vs_all else "no query label occurs among the references"
        raise VembedError(f"no query has a relevant reference ({why}); Recall@K and MAP@R are undefined")

    available = len(references) - int(all_vs_all)
    hits = dict.fromkeys(ks, 0)
    average_precision = torch.empty(len(used), dtype=torch.float64)  # AP@R per used query
    buffer = _scores_buffer(len(used), references, chunk_size)
    members = _ClassMembers(reference_codes, class_sizes)
    for start, stop in _chunks(len(used), chunk_size, progress, "retrieval"):
        rows = used[start:stop]
        r = num_relevant[rows]
        exclude = rows if all_vs_all else None
        scores = _similarities(queries[rows], references, exclude, buffer[: stop - start])
        # The top R (for MAP@R; at least _SHORTLIST) is selected; Recall@K needs only the rank of the
        # first relevant reference: read off the shortlist, or counted for the rows that miss it.
        k = min(max(int(r.max()), _SHORTLIST), available)
        _, neighbours = _select(scores, k, exclude is not None)
        relevant = reference_codes[neighbours] == query_codes[rows, None]  # [c, k] bool
        first = first_relevant(relevant)
        missed = torch.nonzero(first == 0).squeeze(1)
        if len(missed):
            first[missed] = members.first_relevant_rank(scores[missed], query_codes[rows[missed]])
        for kk in ks:
            hits[kk] += int((first <= kk).sum())
        average_precision[start:stop] = average_precision_at_r(relevant, r).cpu()

    metrics: dict[str, float] = {f"recall@{kk}": hits[kk] / len(used) for kk in ks}
    metrics["map@r"] = float(average_precision.mean())
    metrics["num_queries"] = len(used)
    metrics["num_skipped"] = num_skipped
    return metrics


def first_relevant(relevant: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's first relevant neighbour in a ``[c, k]`` bool shortlist; 0 if none.

    Recall@K needs only this rank: a row that misses the shortlist gets it from
    :meth:`_ClassMembers.first_relevant_rank` (cheaper than selecting ``max(ks)`` for every row).
    """
    first = relevant.to(torch.uint8).argmax(dim=1) + 1
    return first.masked_fill_(~relevant.any(dim=1), 0)


def average_precision_at_r(relevant: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """AP@R of each row of a ``[c, k]`` bool ranking (``k`` ≥ the row's ``R``), in float64."""
    ranks = torch.arange(1, relevant.shape[1] + 1, device=relevant.device)
    precision = relevant.cumsum(dim=1) / ranks
    counted = relevant & (ranks <= r[:, None])
    return (precision * counted).sum(dim=1, dtype=torch.float64) / r


def ranking_device(model) -> torch.device | None:
    """The model's GPU when it has one (ranking there is exact too, and far faster), else None."""
    device = getattr(model, "device", None)
    return device if device is not None and device.type == "cuda" else None


def labels_to_codes(labels) -> torch.Tensor:
    """Class labels (ints or strings; tensor, numpy array or list) → int64 codes ``0..C-1``.

    Codes follow the sorted order of the distinct labels, so equal labels get equal codes.
    """
    _, codes = np.unique(_as_labels(labels, "labels"), return_inverse=True)
    return torch.from_numpy(codes.reshape(-1).astype(np.int64))


# --------------------------------------------------------------------------------------------------
# ranking


def _rank(
    block: torch.Tensor,
    references: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None,
    scores: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of one query block, best first, equal scores by lower reference index.

    ``exclude[j]`` is the reference index that query ``j`` must not return (itself), or None.
    ``k`` must be at least 1 and at most the number of references available to every query.
    ``scores`` is a ``[len(block), len(references)]`` buffer for the similarities, reused across
    chunks so that the largest allocation is made once rather than once per chunk.
    """
    return _select(_similarities(block, references, exclude, scores), k, exclude is not None)


def _similarities(
    block: torch.Tensor, references: torch.Tensor, exclude: torch.Tensor | None, scores: torch.Tensor
) -> torch.Tensor:
    """Inner products of a query block with every reference into ``scores``; excluded ones -inf."""
    torch.mm(block, references.T, out=scores)
    if exclude is not None:
        scores[torch.arange(len(block), device=scores.device), exclude] = float("-inf")
    return scores


def _select(scores: torch.Tensor, k: int, excluded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``scores``, best first, equal scores by lower index (see :func:`_rank`)."""
    # One extra candidate shows whether the k-th score also occurs among the references left out.
    extra = int(k < scores.shape[1] - excluded)
    values, indices = torch.topk(scores, k + extra, dim=1)
    spill = values[:, k - 1] == values[:, k] if extra else torch.zeros_like(values[:, 0], dtype=torch.bool)
    values, indices = values[:, :k], indices[:, :k]

    # Rows where topk may have kept a higher index and dropped a lower one with the same k-th score:
    # take every score above the k-th, then the lowest-indexed references equal to it.
    for part in torch.nonzero(spill).squeeze(1).split(_TIE_ROWS):
        if len(part) == 0:
            continue
        sub = scores[part]
        kth = values[part, k - 1 :]
        above = sub > kth
        tied = sub == kth
        need = k - above.sum(dim=1, keepdim=True)
        keep = above | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= need))
        indices[part] = torch.nonzero(keep)[:, 1].view(len(part), k)  # ascending index per row
        values[part] = sub.gather(1, indices[part])

    # Order equal scores inside the selection by index: sort by index, then stable sort by score.
    tied_rows = torch.nonzero(spill | (values[:, 1:] == values[:, :-1]).any(dim=1)).squeeze(1)
    if len(tied_rows):
        idx, order = indices[tied_rows].sort(dim=1)
        vals, order = values[tied_rows].gather(1, order).sort(dim=1, descending=True, stable=True)
        values[tied_rows] = vals
        indices[tied_rows] = idx.gather(1, order)
    return values, indices


class _ClassMembers:
    """References grouped by class, to find each query's best relevant reference by gathering."""

    def __init__(self, reference_codes: torch.Tensor, class_sizes: torch.Tensor):
        self.codes = reference_codes
        self.order = torch.argsort(reference_codes, stable=True)  # reference indices, class by class
        self.sizes = class_sizes
        self.starts = torch.cumsum(class_sizes, 0) - class_sizes

    def first_relevant_rank(self, scores: torch.Tensor, query_codes: torch.Tensor) -> torch.Tensor:
        """1-based rank of each row's first same-class reference in :func:`_select`'s order.

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


def _scores_buffer(num_queries: int, references: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Room for one chunk of query × reference similarities."""
    rows = min(chunk_size, num_queries)
    return torch.empty(rows, len(references), dtype=torch.float32, device=references.device)


def _chunks(total: int, chunk_size: int, show: bool, description: str) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` bounds of consecutive chunks of ``total`` rows, with an optional progress bar."""
    bounds = [(start, min(start + chunk_size, total)) for start in range(0, total, chunk_size)]
    if not show:
        yield from bounds
        return
    with progress_bar() as bar:
        task = bar.add_task(description, total=total)
        for start, stop in bounds:
            yield start, stop
            bar.advance(task, stop - start)


# --------------------------------------------------------------------------------------------------
# input checks


def _as_embeddings(x, name: str, device: torch.device | None = None) -> torch.Tensor:
    """A ``[N, D]`` float32 tensor with finite values, from a tensor or numpy array."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise VembedError(f"{name} must hold numbers, got a numpy array of dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise VembedError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise VembedError(f"{name} must be 2-D [items, dim], got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise VembedError(f"{name} has zero-width embeddings (shape {tuple(x.shape)})")
    x = x.detach().to(device=device, dtype=torch.float32).contiguous()
    if not torch.isfinite(x).all():
        bad = int(torch.nonzero(~torch.isfinite(x).all(dim=1))[0])
        raise VembedError(f"{name} contains NaN or infinite values (first in row {bad})")
    return x


def _as_labels(labels, name: str) -> np.ndarray:
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


def _joint_codes(query_labels, reference_labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes for query and reference labels from one shared mapping."""
    queries = _as_labels(query_labels, "query_labels")
    references = _as_labels(reference_labels, "reference_labels")
    if (queries.dtype.kind in "US") != (references.dtype.kind in "US"):
        kinds = ["strings" if a.dtype.kind in "US" else "integers" for a in (queries, references)]
        raise VembedError(
            f"query_labels are {kinds[0]} but reference_labels are {kinds[1]}; they must be the same kind"
        )
    codes = labels_to_codes(np.concatenate([queries, references]))
    return codes[: len(queries)], codes[len(queries) :]


def _check_same_dim(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise VembedError(
            f"{a_name} has dimension {a.shape[1]} but {b_name} has dimension {b.shape[1]}; "
            "they must come from the same model"
        )


def _check_same_length(embeddings: torch.Tensor, e_name: str, codes: torch.Tensor, l_name: str) -> None:
    if len(embeddings) != len(codes):
        raise VembedError(f"{e_name} has {len(embeddings)} rows but {l_name} has {len(codes)} labels")


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise VembedError(f"{name} must be a positive integer, got {value!r}")


def _check_ks(ks: Sequence[int]) -> list[int]:
    """Distinct positive ks in increasing order."""
    ks = [ks] if isinstance(ks, int) else list(ks)
    if not ks:
        raise VembedError("ks is empty: give at least one K for Recall@K")
    for k in ks:
        _check_positive_int(k, "every K in ks")
    return sorted({int(k) for k in ks})
