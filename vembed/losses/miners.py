"""Miners: which (anchor, positive, negative) combinations of a batch a loss learns from.

A miner sees cosine distances ``[N, M]`` (local anchors x candidates of every rank) with the masks of
positives and negatives, and returns either triplets (:meth:`Miner.triplets`, for the triplet loss) or
the same choice as pair masks (:meth:`Miner.pairs`, for InfoNCE and SupCon), as pytorch-metric-learning
converts between tuple forms. Mining runs without gradients.

- ``hard`` (Hermans et al. "batch hard"): per anchor, the farthest positive and the nearest negative;
- ``semihard`` (FaceNet): per (anchor, positive), the nearest negative farther than the positive but
  within the margin (``d_ap < d_an < d_ap + margin``);
- ``all``: every triplet that violates the margin (``d_an < d_ap + margin``);
- ``multi_similarity`` (Wang et al. 2019, pytorch-metric-learning's ``MultiSimilarityMiner``): per anchor,
  the positives less similar than its most similar negative plus ``margin`` (epsilon, default 0.1 for
  this miner) and the negatives more similar than its least similar positive minus ``margin``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from vembed.errors import VembedError
from vembed.losses._common import check_non_negative

__all__ = [
    "MINERS",
    "MINING_STRATEGIES",
    "AllTripletsMiner",
    "HardMiner",
    "Miner",
    "MultiSimilarityMiner",
    "SemiHardMiner",
    "build_miner",
]

Triplets = tuple[Tensor, Tensor, Tensor]


class Miner:
    name: ClassVar[str] = ""

    def __init__(self, margin: float = 0.2):
        self.margin = check_non_negative(margin, "margin", f"{self.name} miner")

    def triplets(self, distances: Tensor, positives: Tensor, negatives: Tensor) -> Triplets:
        """``(anchor, positive, negative)`` index tensors: anchors index rows, the others columns."""
        raise NotImplementedError

    @torch.no_grad()
    def pairs(self, distances: Tensor, positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
        """The mined triplets as ``(positive pairs, negative pairs)`` masks shaped like ``distances``."""
        anchor, positive, negative = self.triplets(distances, positives, negatives)
        mined_positives = torch.zeros_like(positives)
        mined_negatives = torch.zeros_like(negatives)
        mined_positives[anchor, positive] = True
        mined_negatives[anchor, negative] = True
        return mined_positives, mined_negatives

    def __repr__(self) -> str:
        return f"{type(self).__name__}(margin={self.margin})"


class HardMiner(Miner):
    name: ClassVar[str] = "hard"

    @torch.no_grad()
    def triplets(self, distances: Tensor, positives: Tensor, negatives: Tensor) -> Triplets:
        distances = distances.detach()
        valid = positives.any(dim=1) & negatives.any(dim=1)
        hardest_positive = distances.masked_fill(~positives, -torch.inf).argmax(dim=1)
        hardest_negative = distances.masked_fill(~negatives, torch.inf).argmin(dim=1)
        anchor = torch.nonzero(valid).flatten()
        return anchor, hardest_positive[anchor], hardest_negative[anchor]


class _MarginMiner(Miner):
    def _violating(self, distances: Tensor, positives: Tensor, negatives: Tensor):
        anchor, positive = torch.nonzero(positives, as_tuple=True)
        d_ap = distances[anchor, positive][:, None]
        d_an = distances[anchor]  # [pairs, M]
        return anchor, positive, d_ap, d_an, negatives[anchor] & (d_an < d_ap + self.margin)


class SemiHardMiner(_MarginMiner):
    name: ClassVar[str] = "semihard"

    @torch.no_grad()
    def triplets(self, distances: Tensor, positives: Tensor, negatives: Tensor) -> Triplets:
        anchor, positive, d_ap, d_an, violating = self._violating(distances.detach(), positives, negatives)
        semihard = violating & (d_an > d_ap)
        negative = d_an.masked_fill(~semihard, torch.inf).argmin(dim=1)
        keep = semihard.any(dim=1)
        return anchor[keep], positive[keep], negative[keep]


class AllTripletsMiner(_MarginMiner):
    name: ClassVar[str] = "all"

    @torch.no_grad()
    def triplets(self, distances: Tensor, positives: Tensor, negatives: Tensor) -> Triplets:
        anchor, positive, _, _, violating = self._violating(distances.detach(), positives, negatives)
        pair, negative = torch.nonzero(violating, as_tuple=True)
        return anchor[pair], positive[pair], negative


class MultiSimilarityMiner(Miner):
    """Pair mining of the multi-similarity loss (in distances ``d = 1 - s``, ``margin`` is epsilon):
    positive ``p`` of anchor ``a`` is kept when ``d_ap + margin > min_n d_an`` (``s_ap - eps < max s_an``),
    negative ``n`` when ``d_an - margin < max_p d_ap`` (``s_an + eps > min s_ap``)."""

    name: ClassVar[str] = "multi_similarity"

    @torch.no_grad()
    def pairs(self, distances: Tensor, positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
        distances = distances.detach()
        nearest_negative = distances.masked_fill(~negatives, torch.inf).amin(dim=1, keepdim=True)
        farthest_positive = distances.masked_fill(~positives, -torch.inf).amax(dim=1, keepdim=True)
        mined_positives = positives & (distances + self.margin > nearest_negative)
        mined_negatives = negatives & (distances - self.margin < farthest_positive)
        return mined_positives, mined_negatives

    @torch.no_grad()
    def triplets(self, distances: Tensor, positives: Tensor, negatives: Tensor) -> Triplets:
        """Every (anchor, mined positive, mined negative) combination."""
        mined_positives, mined_negatives = self.pairs(distances, positives, negatives)
        anchor, positive, negative = torch.nonzero(
            mined_positives[:, :, None] & mined_negatives[:, None, :], as_tuple=True
        )
        return anchor, positive, negative


MINERS: dict[str, type[Miner]] = {
    m.name: m for m in (HardMiner, SemiHardMiner, AllTripletsMiner, MultiSimilarityMiner)
}
MINING_STRATEGIES = tuple(MINERS)


def build_miner(name: str | None, *, margin: float, loss_name: str) -> Miner | None:
    """The miner called ``name`` (None: no mining)."""
    if name is None:
        return None
    if name not in MINERS:
        raise VembedError(f"loss '{loss_name}': unknown mining {name!r}; valid: {', '.join(MINERS)}")
    return MINERS[name](margin)
