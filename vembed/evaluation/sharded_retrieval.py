"""Exact Recall@K and MAP@R split across processes, for sets too large for one device.

Started by ``torchrun`` / ``accelerate launch``, each of W processes holds a contiguous share of the
queries and of the references (in all-vs-all, the same share) on its own device. Query chunks are sent
by the process holding them to all the others; each ranks the chunk against its references, and the W
shortlists are merged into the global one. Every process ends with the metrics of
:func:`vembed.evaluation.retrieval.retrieval_metrics` on the whole set: the same neighbours in the same
order (equal scores by lower global index), so the same Recall@K and MAP@R. Only labels and per-chunk
shortlists are exchanged; each device holds ``N/W`` references and a ``chunk × N/W`` score buffer.

Scores are exactly those of one process when they are exactly representable (as in the tests); in
general a product can round differently in its last bit with another matrix shape, as between GPUs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from vembed.console import progress as progress_bar
from vembed.errors import VembedError
from vembed.evaluation.retrieval import (
    _SHORTLIST,
    _as_embeddings,
    _as_labels,
    _check_ks,
    _check_positive_int,
    _check_same_length,
    _ClassMembers,
    _joint_codes,
    _select,
    average_precision_at_r,
    first_relevant,
    labels_to_codes,
    ranked_before,
)

__all__ = ["sharded_retrieval_metrics"]


def sharded_retrieval_metrics(
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
    """:func:`~vembed.evaluation.retrieval.retrieval_metrics` over the shares of every process.

    Each process passes its own share (rows in global order: process 0's first, then process 1's, ...);
    every process returns the metrics of the whole set. Needs an initialised ``torch.distributed``
    process group (gloo: the shortlists travel through CPU memory). ``progress``: show a bar here.
    """
    ks = _check_ks(ks)
    _check_positive_int(chunk_size, "chunk_size")
    queries = _as_embeddings(query_embeddings, "query_embeddings", device=device)
    all_vs_all = reference_embeddings is None
    local_query_labels = _as_labels(query_labels, "query_labels")
    _check_same_length(queries, "query_embeddings", local_query_labels, "query_labels")
    if all_vs_all:
        if reference_labels is not None:
            raise VembedError("reference_labels was given without reference_embeddings")
        references = queries
    else:
        if reference_labels is None:
            raise VembedError("reference_embeddings was given without reference_labels")
        references = _as_embeddings(reference_embeddings, "reference_embeddings", device=queries.device)
        local_reference_labels = _as_labels(reference_labels, "reference_labels")
        _check_same_length(references, "reference_embeddings", local_reference_labels, "reference_labels")

    labels = _gather_arrays(local_query_labels)
    query_starts = _starts(_gather(len(queries)))
    if all_vs_all:
        query_codes = reference_codes = labels_to_codes(labels)
        reference_starts = query_starts
    else:
        gallery = _gather_arrays(local_reference_labels)
        query_codes, reference_codes = _joint_codes(labels, gallery)
        reference_starts = _starts(_gather(len(references)))
    _check_dims(queries, references)
    if len(query_codes) == 0:
        raise VembedError("query_embeddings is empty on every process: there is nothing to evaluate")

    rank = dist.get_rank()
    ref_start = reference_starts[rank]
    num_references = len(reference_codes)
    class_sizes = torch.bincount(reference_codes, minlength=int(query_codes.max()) + 1)
    num_relevant = class_sizes[query_codes] - int(all_vs_all)
    used = torch.nonzero(num_relevant > 0).squeeze(1)
    if len(used) == 0:
        why = "every class has a single item" if all_vs_all else "no query label occurs among the references"
        raise VembedError(f"no query has a relevant reference ({why}); Recall@K and MAP@R are undefined")

    local_codes = reference_codes[ref_start : ref_start + len(references)].to(queries.device)
    members = _ClassMembers(local_codes, torch.bincount(local_codes, minlength=len(class_sizes)))
    available = num_references - int(all_vs_all)
    hits = dict.fromkeys(ks, 0)
    average_precision = torch.empty(len(used), dtype=torch.float64)
    buffer = torch.empty(min(chunk_size, len(used)), len(references), device=queries.device)
    for owner, start, stop in _chunks(used, query_starts, chunk_size, progress):
        rows = used[start:stop]  # global query indices, all held by ``owner``
        block = _broadcast_rows(queries, rows - query_starts[owner], owner, queries.device)
        scores = torch.mm(block, references.T, out=buffer[: len(rows)])
        if all_vs_all:  # a query never returns itself
            mine = torch.nonzero((rows >= ref_start) & (rows < ref_start + len(references))).squeeze(1)
            scores[mine.to(scores.device), (rows[mine] - ref_start).to(scores.device)] = float("-inf")
        r = num_relevant[rows]
        k = min(max(int(r.max()), _SHORTLIST), available)
        neighbours = _merged_shortlist(scores, k, ref_start, num_references)
        relevant = reference_codes[neighbours] == query_codes[rows, None]
        first = first_relevant(relevant)
        missed = torch.nonzero(first == 0).squeeze(1)
        if len(missed):  # the same rows on every process: they all join the reductions
            first[missed] = _first_relevant_rank(
                members,
                scores[missed.to(scores.device)],
                query_codes[rows[missed]],
                ref_start,
                num_references,
            )
        for kk in ks:
            hits[kk] += int((first <= kk).sum())
        average_precision[start:stop] = average_precision_at_r(relevant, r)

    metrics: dict[str, float] = {f"recall@{kk}": hits[kk] / len(used) for kk in ks}
    metrics["map@r"] = float(average_precision.mean())
    metrics["num_queries"] = len(used)
    metrics["num_skipped"] = len(query_codes) - len(used)
    return metrics


def _merged_shortlist(scores: torch.Tensor, k: int, ref_start: int, num_references: int) -> torch.Tensor:
    """The global top-``k`` reference indices of each row (CPU), from every process' local top-``k``.

    A process' local top-k (best first, equal scores by lower index) holds every member of the global
    top-k that it owns, so sorting the W lists by (score desc, index asc) and keeping k is exact.
    """
    rows = scores.shape[0]
    values = torch.full((rows, k), float("-inf"))
    indices = torch.full((rows, k), num_references, dtype=torch.int64)  # padding sorts last
    local_k = min(k, scores.shape[1])
    if local_k:
        top_values, top_indices = _select(scores, local_k, False)
        values[:, :local_k] = top_values.cpu()
        indices[:, :local_k] = top_indices.cpu() + ref_start
    all_values, all_indices = _all_gather(values), _all_gather(indices)
    candidates, order = torch.cat(all_indices, dim=1).sort(dim=1)
    ranked = torch.cat(all_values, dim=1).gather(1, order).sort(dim=1, descending=True, stable=True).indices
    return candidates.gather(1, ranked[:, :k])


def _first_relevant_rank(
    members: _ClassMembers, scores: torch.Tensor, codes: torch.Tensor, ref_start: int, num_references: int
) -> torch.Tensor:
    """Global 1-based rank of each row's first relevant reference (rows that missed the shortlist):
    the best relevant score over all processes, the lowest index with it, then the references
    ranked before it, counted on each process and summed."""
    device = scores.device
    local_best, local_first = (t.cpu() for t in members.best_relevant(scores, codes.to(device)))
    best = local_best.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MAX)
    here = (local_best == best) & (local_first < scores.shape[1])
    first = torch.where(here, local_first + ref_start, num_references)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    before = ranked_before(scores, best.to(device), (first - ref_start).to(device)).cpu()
    dist.all_reduce(before)
    return 1 + before


def _chunks(
    used: torch.Tensor, query_starts: list[int], chunk_size: int, show: bool
) -> Iterator[tuple[int, int, int]]:
    """``(owner, start, stop)``: chunks of positions in ``used``, each within one process' share."""
    bounds = []
    cuts = torch.searchsorted(used, torch.tensor(query_starts[1:], dtype=used.dtype)).tolist()
    edges = [0, *cuts, len(used)]
    for owner in range(len(query_starts) - 1):
        for start in range(edges[owner], edges[owner + 1], chunk_size):
            bounds.append((owner, start, min(start + chunk_size, edges[owner + 1])))
    if not show:
        yield from bounds
        return
    with progress_bar() as bar:
        task = bar.add_task("retrieval", total=len(used))
        for owner, start, stop in bounds:
            yield owner, start, stop
            bar.advance(task, stop - start)


def _broadcast_rows(
    queries: torch.Tensor, local_rows: torch.Tensor, owner: int, device: torch.device
) -> torch.Tensor:
    block = torch.empty(len(local_rows), queries.shape[1])
    if dist.get_rank() == owner:
        block.copy_(queries[local_rows.to(queries.device)].cpu())
    dist.broadcast(block, owner)
    return block.to(device)


def _all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return out


def _gather(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _gather_arrays(labels: np.ndarray) -> np.ndarray:
    """Every process' labels, concatenated in process order."""
    parts = [part for part in _gather(labels) if len(part)]  # an empty share has no label kind
    if len({part.dtype.kind in "US" for part in parts}) > 1:
        raise VembedError("labels are integers on some processes and strings on others")
    return np.concatenate(parts) if parts else labels


def _starts(sizes: list[int]) -> list[int]:
    """Each process' first global row, and the total at the end."""
    return [0, *np.cumsum(sizes).tolist()]


def _check_dims(queries: torch.Tensor, references: torch.Tensor) -> None:
    dims = set(_gather((queries.shape[1], references.shape[1])))
    widths = {d for pair in dims for d in pair}
    if len(widths) > 1:
        raise VembedError(
            f"embeddings have dimensions {sorted(widths)} across processes; they must come from the same model"
        )
