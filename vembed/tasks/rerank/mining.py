"""The re-ranker's pairs and neighbour tables: what ``train.rerank_from``'s embedding ranks first.

Training pairs (open-metric-learning's recipe for its pairwise re-ranker): for every training image,
its ``top_n`` nearest other images by the embedder give positives (same label) and negatives (other
labels); an image none of whose top ``top_n`` shares its label gets its nearest same-label images as
positives instead (up to ``top_n``), so it still teaches the model what "same" looks like.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vembed.data.records import ImageRecord
from vembed.errors import VembedError
from vembed.neighbours import topk


@dataclass(frozen=True)
class NeighbourTable:
    """Each query's first ``top_n`` references by embedding similarity, best first (all-vs-all: itself
    excluded); ``rows`` are the record positions the embeddings belong to (those that decoded)."""

    candidates: torch.Tensor  # [Q, N] positions in `rows`' order
    similarities: torch.Tensor  # [Q, N] float32
    embeddings: torch.Tensor  # [Q, D]
    rows: list[int]


def neighbour_table(embeddings: torch.Tensor, rows: Sequence[int], top_n: int) -> NeighbourTable:
    """The all-vs-all top-``top_n`` table of ``embeddings`` (exact inner product, :func:`vembed.neighbours.topk`)."""
    if len(embeddings) < 2:
        raise VembedError(f"{len(embeddings)} image(s) embedded: re-ranking needs at least 2")
    sims, cands = topk(embeddings, embeddings, top_n, exclude_self=True)
    return NeighbourTable(cands, sims, embeddings, list(rows))


def mine_pairs(
    candidates: torch.Tensor, codes: torch.Tensor, embeddings: torch.Tensor | None = None
) -> list[tuple[int, int, int]]:
    """``(query, candidate, same)`` training pairs from a neighbour table (see the module docstring).

    ``candidates`` ``[Q, N]`` (``-1``: none), ``codes`` the label code of each of the Q items. The
    fallback positives of a query with no same-label neighbour are its nearest same-label items by
    ``embeddings`` (inner product), or the first ones in index order without them.
    """
    codes = torch.as_tensor(codes).long()
    if candidates.shape[0] != len(codes):
        raise VembedError(f"{candidates.shape[0]} neighbour rows but {len(codes)} labels")
    top_n = candidates.shape[1]
    members: dict[int, list[int]] = {}
    for index, code in enumerate(codes.tolist()):
        members.setdefault(code, []).append(index)
    pairs: list[tuple[int, int, int]] = []
    for query, row in enumerate(candidates.tolist()):
        row = [c for c in row if c >= 0 and c != query]
        same = [c for c in row if codes[c] == codes[query]]
        pairs += [(query, c, int(c in same)) for c in row]
        if same:
            continue
        others = [m for m in members[int(codes[query])] if m != query]
        if embeddings is not None and others:
            scores = embeddings[others] @ embeddings[query]
            others = [others[i] for i in torch.argsort(-scores, stable=True).tolist()]
        pairs += [(query, c, 1) for c in others[:top_n]]
    return pairs


def embed_for_table(embedder, records: Sequence[ImageRecord], settings, *, show_progress: bool, what: str):
    """``(embeddings, rows)`` of ``records`` by ``embedder`` (eval preprocessing; ``rows``: the records
    that decoded)."""
    from vembed.inference import embed_options, embed_records

    out = embed_records(
        embedder,
        records,
        embed_options(settings, show_progress=show_progress),
        description=f"embedding the {what} set with train.rerank_from",
    )
    return out.embeddings, out.indices
