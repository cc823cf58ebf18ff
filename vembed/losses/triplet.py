"""Triplet loss on cosine distance with an in-batch miner (batch-hard, semi-hard or all)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from vembed.losses._common import check_batch, check_non_negative, float32_forward, normalize, zero_with_grad
from vembed.losses.distributed import gather_candidates, self_mask
from vembed.losses.memory import remember, with_memory
from vembed.losses.miners import MINING_STRATEGIES, build_miner

__all__ = ["MINING_STRATEGIES", "TripletLoss"]


class TripletLoss(nn.Module):
    """``relu(d(a, p) - d(a, n) + margin)`` with ``d = 1 - cos``, over triplets mined from the batch.

    Mining (``mining=``):

    - ``"hard"`` (default, Hermans et al. "batch hard"): per anchor, the farthest positive and the nearest
      negative; averaged over anchors (zero-loss anchors included).
    - ``"semihard"`` (FaceNet): per (anchor, positive) pair, the nearest negative that is farther than the
      positive but within the margin (``d_ap < d_an < d_ap + margin``); pairs without one are skipped.
    - ``"all"``: every (anchor, positive, negative) triplet that violates the margin
      (``d_an < d_ap + margin``), averaged over those (Hermans et al. "batch all, non-zero").

    Anchors with no positive or no negative in the batch are skipped; with no triplet at all the loss is
    0 (with grad). Candidates come from every rank when training on several processes.

    Args:
        margin: in cosine-distance units (distances lie in [0, 2]); default 0.2.
        mining: one of "hard", "semihard", "all".
    """

    needs_num_classes: ClassVar[bool] = False
    batches: ClassVar[str] = "pk"
    name: ClassVar[str] = "triplet"
    uses_memory: ClassVar[bool] = True  # train.memory_bank: extra candidates (vembed.losses.memory)
    summary: ClassVar[str] = "margin on cosine distance with hard-negative mining (P x K batches)"

    def __init__(self, margin: float = 0.2, *, mining: str = "hard") -> None:
        super().__init__()
        self.margin = check_non_negative(margin, "margin", self.name)
        self.miner = build_miner(mining, margin=self.margin, loss_name=self.name)
        self.mining = mining

    def _distances(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(distances [N, M], positives [N, M], negatives [N, M])``, local anchors vs. all candidates."""
        anchors = normalize(embeddings)
        candidates, candidate_labels, offset = gather_candidates(anchors, labels)
        candidates, candidate_labels = with_memory(self, candidates, candidate_labels)
        distances = 1.0 - anchors @ candidates.T
        own = self_mask(anchors.shape[0], candidates.shape[0], offset, anchors.device)
        same = labels[:, None] == candidate_labels[None, :]
        return distances, same & ~own, ~same

    @torch.no_grad()
    def mine(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mined triplets as index tensors ``(anchor, positive, negative)``.

        ``anchor`` indexes the local batch; ``positive``/``negative`` index the candidates (the local
        batch on one process, the concatenation of every rank's batch on several).
        """
        check_batch(embeddings, labels, self.name)
        return self.miner.triplets(*self._distances(embeddings.float(), labels))

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels, self.name)
        distances, positives, negatives = self._distances(embeddings, labels)
        anchor, positive, negative = self.miner.triplets(distances, positives, negatives)
        remember(self, normalize(embeddings), labels)
        if anchor.numel() == 0:
            return zero_with_grad(embeddings)
        losses = distances[anchor, positive] - distances[anchor, negative] + self.margin
        return losses.clamp(min=0).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}"
