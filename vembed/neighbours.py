"""Exact nearest-neighbour ranking: the one place in vembed that ranks neighbours.

Search (:mod:`vembed.index.search`), the store's exact top-k, few-shot and kNN classification call
:func:`topk`; the retrieval metrics (:mod:`vembed.evaluation.retrieval`) rank with the same pieces
(:func:`similarities`, :func:`select_top`).

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

__all__ = [
    "advancing",
    "as_embeddings",
    "chunk_bounds",
    "ranking_device",
    "select_top",
    "similarities",
    "topk",
]

# Rows of a chunk whose top-k boundary ties are re-selected at once (bounds the int32 cumsum buffer).
_TIE_ROWS = 256


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
    queries = as_embeddings(queries, "queries")
    references = as_embeddings(references, "references", device=queries.device)
    check_same_dim(queries, "queries", references, "references")
    check_positive_int(k, "k")
    check_positive_int(chunk_size, "chunk_size")
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
    buffer = scores_buffer(len(queries), references, chunk_size)
    for start, stop in advancing(chunk_bounds(len(queries), chunk_size), progress, "top-k"):
        exclude = torch.arange(start, stop, device=queries.device) if exclude_self else None
        chunk_scores, chunk_indices = _rank(
            queries[start:stop], references, k, exclude, buffer[: stop - start]
        )
        scores[start:stop] = chunk_scores.cpu()
        indices[start:stop] = chunk_indices.cpu()
    return scores, indices


def ranking_device(model) -> torch.device | None:
    """The model's GPU when it has one (ranking there is exact too, and far faster), else None."""
    device = getattr(model, "device", None)
    return device if device is not None and device.type == "cuda" else None


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
    return select_top(similarities(block, references, exclude, scores), k, exclude is not None)


def similarities(
    block: torch.Tensor, references: torch.Tensor, exclude: torch.Tensor | None, scores: torch.Tensor
) -> torch.Tensor:
    """Inner products of a query block with every reference into ``scores``; excluded ones -inf."""
    torch.mm(block, references.T, out=scores)
    if exclude is not None:
        scores[torch.arange(len(block), device=scores.device), exclude] = float("-inf")
    return scores


def select_top(scores: torch.Tensor, k: int, excluded: bool) -> tuple[torch.Tensor, torch.Tensor]:
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


def scores_buffer(num_queries: int, references: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Room for one chunk of query × reference similarities."""
    rows = min(chunk_size, num_queries)
    return torch.empty(rows, len(references), dtype=torch.float32, device=references.device)


def chunk_bounds(total: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` bounds of consecutive chunks of ``total`` rows."""
    return [(start, min(start + chunk_size, total)) for start in range(0, total, chunk_size)]


def advancing(bounds: Sequence[tuple], show: bool, description: str) -> Iterator[tuple]:
    """``bounds`` (tuples ending in ``start, stop``) one by one, with an optional progress bar."""
    if not show:
        yield from bounds
        return
    with progress_bar() as bar:
        task = bar.add_task(description, total=sum(b[-1] - b[-2] for b in bounds))
        for bound in bounds:
            yield bound
            bar.advance(task, bound[-1] - bound[-2])


def as_embeddings(x, name: str, device: torch.device | None = None) -> torch.Tensor:
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


def check_same_dim(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise VembedError(
            f"{a_name} has dimension {a.shape[1]} but {b_name} has dimension {b.shape[1]}; "
            "they must come from the same model"
        )


def check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise VembedError(f"{name} must be a positive integer, got {value!r}")
