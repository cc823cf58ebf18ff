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

import bisect
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from vembed.errors import VembedError
from vembed.evaluation.retrieval import (
    ClassMembers,
    as_labels,
    check_ks,
    check_same_length,
    embedding_inputs,
    joint_codes,
    labels_to_codes,
    ranked_before,
    ranked_metrics,
)
from vembed.neighbours import check_positive_int, select_top

__all__ = ["ShardedNeighbours", "sharded_retrieval_metrics"]


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
    ks = check_ks(ks)
    check_positive_int(chunk_size, "chunk_size")
    queries, references = embedding_inputs(query_embeddings, reference_embeddings, reference_labels, device)
    all_vs_all = reference_embeddings is None
    local_query_labels = as_labels(query_labels, "query_labels")
    check_same_length(queries, "query_embeddings", local_query_labels, "query_labels")
    if not all_vs_all:
        local_reference_labels = as_labels(reference_labels, "reference_labels")
        check_same_length(references, "reference_embeddings", local_reference_labels, "reference_labels")

    labels = _gather_arrays(local_query_labels)
    query_starts = _starts(_gather(len(queries)))
    if all_vs_all:
        query_codes = reference_codes = labels_to_codes(labels)
        reference_starts = query_starts
    else:
        gallery = _gather_arrays(local_reference_labels)
        query_codes, reference_codes = joint_codes(labels, gallery)
        reference_starts = _starts(_gather(len(references)))
    _check_dims(queries, references)
    if len(query_codes) == 0:
        raise VembedError("query_embeddings is empty on every process: there is nothing to evaluate")
    source = ShardedNeighbours(
        queries, references, reference_codes, int(query_codes.max()) + 1, all_vs_all,
        query_starts=query_starts, reference_start=reference_starts[dist.get_rank()],
    )  # fmt: skip
    return ranked_metrics(
        source, query_codes, reference_codes, all_vs_all=all_vs_all, ks=ks, chunk_size=chunk_size,
        progress=progress,
    )  # fmt: skip


class ShardedNeighbours:
    """Exact ranking split across processes: this process' ``references`` are global rows
    ``reference_start ...``; its ``queries`` are rows ``query_starts[rank] ...`` of the global order."""

    exhaustive = True

    def __init__(
        self,
        queries: torch.Tensor,
        references: torch.Tensor,
        reference_codes: torch.Tensor,
        num_classes: int,
        all_vs_all: bool,
        *,
        query_starts: list[int],
        reference_start: int,
    ):
        self.queries, self.references, self.all_vs_all = queries, references, all_vs_all
        self.query_starts, self.ref_start = query_starts, reference_start
        self.num_references = len(reference_codes)
        local = reference_codes[reference_start : reference_start + len(references)].to(queries.device)
        self.members = ClassMembers(local, torch.bincount(local, minlength=num_classes))
        self.scores = None

    def plan(self, used: torch.Tensor, chunk_size: int) -> list[tuple[int, int]]:
        """Chunks of positions in ``used``, each within one process' share of the queries."""
        self.buffer = torch.empty(
            min(chunk_size, len(used)), len(self.references), device=self.queries.device
        )
        bounds = []
        cuts = torch.searchsorted(used, torch.tensor(self.query_starts[1:], dtype=used.dtype)).tolist()
        edges = [0, *cuts, len(used)]
        for owner in range(len(self.query_starts) - 1):
            for start in range(edges[owner], edges[owner + 1], chunk_size):
                bounds.append((start, min(start + chunk_size, edges[owner + 1])))
        return bounds

    def shortlist(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        """The global top-``k`` (CPU): the owner of ``rows`` sends them, every process ranks them
        against its references, and the shortlists are merged."""
        owner = bisect.bisect_right(self.query_starts, int(rows[0])) - 1
        block = _broadcast_rows(self.queries, rows - self.query_starts[owner], owner, self.queries.device)
        scores = torch.mm(block, self.references.T, out=self.buffer[: len(rows)])
        if self.all_vs_all:  # a query never returns itself
            start, stop = self.ref_start, self.ref_start + len(self.references)
            mine = torch.nonzero((rows >= start) & (rows < stop)).squeeze(1)
            scores[mine.to(scores.device), (rows[mine] - start).to(scores.device)] = float("-inf")
        self.scores = scores
        return _merged_shortlist(scores, k, self.ref_start, self.num_references)

    def first_relevant_rank(self, missed: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The same rows on every process (the shortlists are merged): they all join the reductions."""
        scores = self.scores[missed.to(self.scores.device)]
        return _first_relevant_rank(self.members, scores, codes, self.ref_start, self.num_references)


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
        top_values, top_indices = select_top(scores, local_k, False)
        values[:, :local_k] = top_values.cpu()
        indices[:, :local_k] = top_indices.cpu() + ref_start
    all_values, all_indices = _all_gather(values), _all_gather(indices)
    candidates, order = torch.cat(all_indices, dim=1).sort(dim=1)
    ranked = torch.cat(all_values, dim=1).gather(1, order).sort(dim=1, descending=True, stable=True).indices
    return candidates.gather(1, ranked[:, :k])


def _first_relevant_rank(
    members: ClassMembers, scores: torch.Tensor, codes: torch.Tensor, ref_start: int, num_references: int
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
