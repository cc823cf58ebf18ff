"""Multi-similarity loss (Wang et al. 2019, "Multi-Similarity Loss with General Pair Weighting").

The definition of pytorch-metric-learning's ``MultiSimilarityLoss`` (its values, tested on fixed inputs),
on cosine similarities ``s`` of L2-normalised embeddings, per anchor ``i``::

    l_i = 1/alpha * log(1 + sum_{p in P(i)} exp(-alpha (s_ip - base)))
        + 1/beta  * log(1 + sum_{n in N(i)} exp( beta (s_in - base)))

averaged over the anchors (those without pairs count 0). ``P(i)``/``N(i)`` are the pairs the miner kept:
by default the multi-similarity miner (epsilon ``mining_margin`` 0.1), as in the paper. On several
processes the anchors are this rank's rows and the candidates come from every rank.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from vembed.errors import VembedError
from vembed.losses._common import check_positive
from vembed.losses.memory import PairMaskLoss
from vembed.losses.miners import build_miner

__all__ = ["MultiSimilarityLoss", "log1p_sum_exp"]


def log1p_sum_exp(x: Tensor, mask: Tensor) -> Tensor:
    """``log(1 + sum_j exp(x_ij))`` over the ``mask``-ed entries of each row (0 for an empty row)."""
    zeros = torch.zeros_like(x[:, :1])
    return torch.logsumexp(torch.cat([zeros, x.masked_fill(~mask, -torch.inf)], dim=1), dim=1)


class MultiSimilarityLoss(PairMaskLoss):
    """Multi-similarity loss with its miner; see the module docstring.

    Args:
        alpha, beta: the positive and negative scales (2 and 50, as in the paper and PML).
        base: the similarity margin lambda (0.5).
        mining: ``"multi_similarity"`` (default), another miner of :mod:`vembed.losses.miners`, or None
            (every pair).
        mining_margin: the miner's margin (epsilon of the multi-similarity miner, 0.1).
    """

    needs_num_classes: ClassVar[bool] = False
    batches: ClassVar[str] = "pk"
    name: ClassVar[str] = "multi_similarity"
    uses_memory: ClassVar[bool] = True  # train.memory_bank: extra candidates (vembed.losses.memory)
    summary: ClassVar[str] = "multi-similarity: weighted hard pairs, its own miner (P x K batches)"

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        *,
        mining: str | None = "multi_similarity",
        mining_margin: float = 0.1,
    ) -> None:
        super().__init__()
        self.alpha = check_positive(alpha, "alpha", self.name)
        self.beta = check_positive(beta, "beta", self.name)
        if isinstance(base, bool) or not isinstance(base, (int, float)):
            raise VembedError(f"loss '{self.name}': base must be a number, got {base!r}")
        self.base = float(base)
        self.mining = mining
        self.miner = build_miner(mining, margin=mining_margin, loss_name=self.name)

    def from_pairs(self, s: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        pos = log1p_sum_exp(-self.alpha * (s - self.base), positives) / self.alpha
        neg = log1p_sum_exp(self.beta * (s - self.base), negatives) / self.beta
        return (pos + neg).mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}, mining={self.mining!r}"
