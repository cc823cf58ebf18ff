"""Re-ranking a ranking's first N results with a pairwise model (:mod:`vembed.models.pairwise`).

The one definition of a re-ranked list, shared by ``vembed eval retrieval --rerank``, ``vembed search
--rerank`` and the re-ranker's own training validation (``train.task: rerank``): for each query, its
first ``top_n`` candidates (best first, by embedding similarity ``s``) get the score
``w * p + (1 - w) * s`` (``p``: the pairwise model's same-item probability, ``w``: its blend weight) and
are sorted by it, ties kept in their embedding order; everything after ``top_n`` stays where it was.
``w = 0`` returns the ranking unchanged (no pair is scored).

:func:`choose_weight` is the calibration: the weight of a grid in ``[0, 1]`` with the best Recall@1 on
labelled queries, 0 unless another one is strictly better — a re-ranker that does not help changes
nothing, and the re-ranked Recall@1 is never below the embedding's on the set it was chosen on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from vembed.console import progress, rate_column
from vembed.data.datasets import BadItem, ImageDataset, build_loader
from vembed.data.images import EvalTransform
from vembed.data.records import ImageRecord
from vembed.errors import VembedError
from vembed.models.pairwise import PairwiseHead, PairwiseModel, side_by_side

GRID = tuple(i / 20 for i in range(21))  # the blend weights calibration tries: 0, 0.05, ..., 1


class PairImages(Dataset):
    """Pairs of records → ``(side-by-side pixels, pair index)``; a pair with an undecodable image is a
    :class:`~vembed.data.datasets.BadItem` under ``skip_bad``.

    Items are a pair index, or ``(index, tag)`` when the transform draws a seeded augmentation (training:
    each image of the pair from ``random.Random(f"{tag}/a")`` / ``".../b"``).
    """

    def __init__(self, images: ImageDataset, pairs: Sequence[tuple[int, int]]):
        self.images, self.pairs = images, list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item):
        index, tag = item if isinstance(item, tuple) else (item, None)
        a, b = self.pairs[index][:2]
        transform = self.images.transform
        if tag is not None and getattr(transform, "takes_generator", False):
            import random

            left = self.images.load(a, lambda image: transform(image, random.Random(f"{tag}/a")))
            right = self.images.load(b, lambda image: transform(image, random.Random(f"{tag}/b")))
        else:
            left, right = self.images[a], self.images[b]
        for bad in (left, right):
            if isinstance(bad, BadItem):
                return BadItem(index, bad.message)
        return side_by_side(left[0], right[0]), index


def pair_probabilities(
    model: PairwiseModel,
    records: Sequence[ImageRecord],
    pairs: Sequence[tuple[int, int]],
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    skip_bad: bool = False,
    max_pixels: int | None = None,
    show_progress: bool = False,
    description: str = "scoring pairs",
) -> tuple[torch.Tensor, list[str]]:
    """``p`` of each pair of ``records`` indices: float32 ``[len(pairs)]`` (NaN where an image did not
    decode, with ``skip_bad``) and the problems met."""
    from vembed.inference import _without_worker_tracebacks

    probs = torch.full((len(pairs),), float("nan"))
    if not pairs:
        return probs, []
    dataset = PairImages(
        ImageDataset(records, EvalTransform(model.spec), skip_bad=skip_bad, max_pixels=max_pixels), pairs
    )
    loader = build_loader(
        dataset, batch_size=batch_size, num_workers=min(num_workers, len(pairs) // batch_size + 1)
    )
    problems: list[str] = []
    done = 0
    with progress(rate_column(), enabled=show_progress) as bar:
        task = bar.add_task(description, total=len(pairs), rate=0.0, visible=show_progress)
        for batch in _without_worker_tracebacks(loader):
            problems += [b.message for b in batch.bad]
            if len(batch.indices):
                probs[batch.indices] = model.probabilities(batch.pixel_values)
            done += len(batch.indices) + len(batch.bad)
            bar.update(task, completed=done)
    return probs, problems


def blend(similarities: torch.Tensor, probs: torch.Tensor, weight: float) -> torch.Tensor:
    """``w * p + (1 - w) * s``; where ``p`` is NaN (an image that could not be read) the score is ``s``."""
    s = similarities.float()
    p = torch.where(torch.isnan(probs), s, probs.float())
    return weight * p + (1.0 - weight) * s


def rerank_order(similarities: torch.Tensor, probs: torch.Tensor, weight: float) -> torch.Tensor:
    """The new order of each row's candidates (``[Q, N]`` positions into the row, best first).

    Rows are in embedding order (best first); ``weight == 0`` is the identity. Ties keep that order.
    """
    q, n = similarities.shape
    if weight == 0 or n == 0:
        return torch.arange(n).expand(q, n).clone()
    scores = blend(similarities, probs, weight)
    return torch.sort(-scores, dim=1, stable=True).indices


def apply_order(candidates: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``candidates[q, order[q]]`` for each row."""
    return candidates.gather(1, order.to(candidates.device))


def recall_at_1(candidates: torch.Tensor, query_codes: torch.Tensor, reference_codes: torch.Tensor) -> float:
    """The share of queries whose first candidate has their label (``candidates`` ``[Q, >=1]``)."""
    if len(candidates) == 0:
        raise VembedError("no query to score: Recall@1 is undefined")
    return float((reference_codes[candidates[:, 0]] == query_codes).float().mean())


def choose_weight(
    candidates: torch.Tensor,
    similarities: torch.Tensor,
    probs: torch.Tensor,
    query_codes: torch.Tensor,
    reference_codes: torch.Tensor,
    grid: Sequence[float] = GRID,
) -> tuple[float, dict[float, float]]:
    """The blend weight with the best re-ranked Recall@1 (0 unless another is strictly better) and the
    Recall@1 of every weight of ``grid``."""
    by_weight = {}
    for weight in sorted(set(grid) | {0.0}):
        order = rerank_order(similarities, probs, weight)
        by_weight[weight] = recall_at_1(apply_order(candidates, order), query_codes, reference_codes)
    best = 0.0
    for weight, recall in by_weight.items():
        if recall > by_weight[best] + 1e-12:
            best = weight
    return best, by_weight


def pair_accuracy(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """The share of pairs (that decoded) whose ``p > 0.5`` matches ``targets`` (1 same, 0 different)."""
    ok = ~torch.isnan(probs)
    if not ok.any():
        return float("nan")
    return float(((probs[ok] > 0.5).float() == targets[ok].float()).float().mean())


@dataclass
class Reranker:
    """A loaded re-ranker: its model (on its device, eval mode), weight and default ``top_n``."""

    model: PairwiseModel
    name: str

    @property
    def head(self) -> PairwiseHead:
        return self.model.pair_head

    @property
    def weight(self) -> float:
        return self.head.blend_weight

    def rerank(
        self,
        query_records: Sequence[ImageRecord],
        reference_records: Sequence[ImageRecord],
        candidates: torch.Tensor,
        similarities: torch.Tensor,
        *,
        top_n: int,
        batch_size: int = 64,
        num_workers: int = 2,
        show_progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Re-rank the first ``top_n`` of each row of ``candidates`` (``[Q, K]`` reference indices,
        ``-1``: none) for ``query_records[q]``: ``(candidates, blended scores of the first top_n, problems)``.

        An image that cannot be read (gone since it was indexed) keeps its embedding similarity as its
        score, and is listed in the problems.
        """
        n = min(top_n, candidates.shape[1])
        head_c, head_s = candidates[:, :n], similarities[:, :n].float()
        if self.weight == 0 or n == 0:
            return candidates, head_s, []
        rows, cols = torch.nonzero(head_c >= 0, as_tuple=True)
        records = list(query_records) + list(reference_records)
        offset = len(query_records)
        pairs = [
            (int(q), offset + int(head_c[q, c])) for q, c in zip(rows.tolist(), cols.tolist(), strict=True)
        ]
        flat, problems = pair_probabilities(
            self.model, records, pairs, batch_size=batch_size, num_workers=num_workers, skip_bad=True,
            show_progress=show_progress, description=f"re-ranking the top {n}",
        )  # fmt: skip
        probs = torch.full(head_s.shape, float("nan"))
        probs[rows, cols] = flat
        # a missing candidate (-1, fewer found) sorts last
        scores = torch.where(head_c >= 0, blend(head_s, probs, self.weight), torch.tensor(float("-inf")))
        order = torch.sort(-scores, dim=1, stable=True).indices
        out = candidates.clone()
        out[:, :n] = apply_order(head_c, order)
        return out, scores.gather(1, order), problems


def load_reranker(
    model: str | Path, *, device: str = "auto", dtype: str = "auto", revision: str | None = None
) -> Reranker:
    """The re-ranker saved at ``model`` (a ``train.task=rerank`` run's ``final/`` or its export), or a
    one-line error when that model has no pairwise head."""
    from vembed.models.factory import ModelOptions, build_embedder
    from vembed.models.heads import load_head
    from vembed.models.loader import load_model

    loaded = load_model(model, revision=revision)
    head = load_head(loaded)
    if not isinstance(head, PairwiseHead):
        raise VembedError(
            f"{model}: not a re-ranker (its vembed.json has no pairwise task_head); train one with "
            "train.task=rerank (docs/training.md, Re-ranking)"
        )
    embedder = build_embedder(loaded, ModelOptions(device=device, dtype=dtype))
    pairwise = PairwiseModel.from_embedder(embedder, head.to(embedder.device)).eval()
    return Reranker(pairwise, str(model))
