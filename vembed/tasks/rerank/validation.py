"""The re-ranker's validation: re-ranked Recall@1 of ``train.rerank_from``'s top-N on ``data.val``.

The embedder's neighbour table is computed once (it does not train); each validation scores every
(query, candidate) pair of the table with the pairwise model and picks the blend weight on the grid
(:func:`vembed.rerank.choose_weight`). ``recall@1`` is the re-ranked Recall@1 at that weight, never
below ``embedding_recall@1`` (weight 0 is the embedding's own ranking); the weight chosen by the last
validation of the selected model is the one saved with the re-ranker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vembed.evaluation.base import EvalResult
from vembed.models.pairwise import PairwiseModel
from vembed.rerank import choose_weight, pair_accuracy, pair_probabilities
from vembed.tasks.rerank.mining import NeighbourTable

METRICS = ("recall@1", "embedding_recall@1", "pair_recall@1", "pair_accuracy", "blend_weight")
PRIMARY = "recall@1"


@dataclass
class RerankValidator:
    """``validator(pairwise_model) -> EvalResult`` on a fixed neighbour table of labelled records."""

    records: list  # the validation records the table's rows index (those that decoded)
    codes: torch.Tensor  # label code per table row
    table: NeighbourTable
    batch_size: int = 64
    num_workers: int = 2
    max_pixels: int | None = None

    name = "rerank"
    primary_metric = PRIMARY
    greater_is_better = True
    metrics = list(METRICS)

    def __post_init__(self):
        cands = self.table.candidates
        sizes = torch.bincount(self.codes)
        self.used = torch.nonzero(sizes[self.codes] > 1).squeeze(1)  # queries with a relevant reference
        rows, cols = torch.nonzero(cands[self.used] >= 0, as_tuple=True)
        self.pairs = [
            (int(self.used[r]), int(cands[self.used[r], c]))
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
        ]
        self.cells = (rows, cols)

    def __call__(self, model: PairwiseModel, *, show_progress: bool = True) -> EvalResult:
        cands = self.table.candidates[self.used]
        sims = self.table.similarities[self.used]
        flat, _problems = pair_probabilities(
            model, self.records, self.pairs, batch_size=self.batch_size, num_workers=self.num_workers,
            skip_bad=True, max_pixels=self.max_pixels, show_progress=show_progress,
            description="validating the re-ranker",
        )  # fmt: skip
        probs = torch.full(cands.shape, float("nan"))
        probs[self.cells] = flat
        queries = self.codes[self.used]
        weight, by_weight = choose_weight(cands.clamp(min=0), sims, probs, queries, self.codes)
        targets = (self.codes[cands.clamp(min=0)] == queries[:, None])[self.cells]
        metrics = {
            "recall@1": by_weight[weight],
            "embedding_recall@1": by_weight[0.0],
            "pair_recall@1": by_weight[1.0],
            "pair_accuracy": pair_accuracy(flat, targets),
            "blend_weight": weight,
        }
        return EvalResult(metrics, PRIMARY, True, details={"blend_weight": weight, "by_weight": by_weight})
