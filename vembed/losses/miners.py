"""Miners: which (anchor, positive, negative) combinations of a batch a loss learns from.

A miner sees cosine distances ``[N, M]`` (local anchors x candidates of every rank) with the masks of
positives and negatives, and returns either triplets (:meth:`Miner.triplets`, for the triplet loss) or
the same choice as pair masks (:meth:`Miner.pairs`, for InfoNCE and SupCon), as pytorch-metric-learning
converts between tuple forms. Mining runs without gradients.

- ``hard`` (Hermans et al. "batch hard"): per anchor, the farthest positive and the nearest negative;
- ``semihard`` (FaceNet): per (anchor, positive), the nearest negative farther than the positive but
  within the margin (``d_ap < d_an < d_ap + margin``);
- ``all``: every triplet that violates the margin (``d_an < d_ap + margin``).
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


MINERS: dict[str, type[Miner]] = {m.name: m for m in (HardMiner, SemiHardMiner, AllTripletsMiner)}
MINING_STRATEGIES = tuple(MINERS)


def build_miner(name: str | None, *, margin: float, loss_name: str) -> Miner | None:
    """The miner called ``name`` (None: no mining)."""
    if name is None:
        return None
    if name not in MINERS:
        raise VembedError(f"loss '{loss_name}': unknown mining {name!r}; valid: {', '.join(MINERS)}")
    return MINERS[name](margin)
