"""In-batch contrastive losses: label-aware InfoNCE and supervised contrastive (SupCon).

Both take L2-normalised embeddings [N, D] and integer labels [N]; samples with equal labels are positives.
On several processes the anchors are this rank's rows and the candidates come from every rank
(see ``vembed.losses.distributed``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vembed.errors import VembedError
from vembed.losses._common import check_positive
from vembed.losses.memory import PairMaskLoss
from vembed.losses.miners import build_miner

__all__ = ["InfoNCELoss", "SupConLoss"]

# Stand-in for log(0) in masked logits: finite, so logsumexp over an all-masked row has no NaN gradient.
_MASKED = -1e9


class _TemperatureLoss(PairMaskLoss):
    """Holds the temperature: a fixed float, or a learnable log-temperature clamped to [min, max]; the
    forward both losses share (pairs, mining, memory), around each one's :meth:`_pair_losses`.

    ``temperature=None``: the loss's ``default_temperature``.
    """

    needs_num_classes: ClassVar[bool] = False
    batches: ClassVar[str] = "pk"
    name: ClassVar[str] = ""
    uses_memory: ClassVar[bool] = True  # train.memory_bank: extra candidates (vembed.losses.memory)
    default_temperature: ClassVar[float]

    def __init__(
        self,
        temperature: float | None = None,
        *,
        learnable_temperature: bool = False,
        min_temperature: float = 0.01,
        max_temperature: float = 1.0,
        mining: str | None = None,
        mining_margin: float = 0.2,
    ) -> None:
        super().__init__()
        self.miner = build_miner(mining, margin=mining_margin, loss_name=self.name)
        temperature = self.default_temperature if temperature is None else temperature
        temperature = check_positive(temperature, "temperature", self.name)
        self.min_temperature = check_positive(min_temperature, "min_temperature", self.name)
        self.max_temperature = check_positive(max_temperature, "max_temperature", self.name)
        if not self.min_temperature <= temperature <= self.max_temperature:
            raise VembedError(
                f"loss '{self.name}': temperature {temperature} is outside "
                f"[min_temperature={self.min_temperature}, max_temperature={self.max_temperature}]"
            )
        self.learnable_temperature = bool(learnable_temperature)
        if self.learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self._fixed_temperature = temperature

    @property
    def temperature(self) -> Tensor | float:
        """The temperature in use (a 0-d tensor when learnable)."""
        if self.learnable_temperature:
            low, high = math.log(self.min_temperature), math.log(self.max_temperature)
            return self.log_temperature.clamp(low, high).exp()
        return self._fixed_temperature

    def from_pairs(self, similarities: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        """The mean over anchors that count of their pairs' mean loss (:meth:`_pair_losses`)."""
        pair_losses, valid = self._pair_losses(similarities / self.temperature, positives, negatives)
        anchor_losses = pair_losses.sum(dim=1) / positives.sum(dim=1).clamp(min=1)
        return (anchor_losses * valid).sum() / valid.sum().clamp(min=1)

    def _pair_losses(self, logits: Tensor, positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss of each anchor/positive pair [N, M], anchors that count [N])`` from ``logits`` [N, M]
        (similarities over the temperature) and the pair masks of :func:`pair_masks`."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        temperature = self.temperature
        temperature = float(temperature.detach()) if isinstance(temperature, Tensor) else temperature
        return f"temperature={temperature:.4g}, learnable_temperature={self.learnable_temperature}"


class InfoNCELoss(_TemperatureLoss):
    """Label-aware InfoNCE with in-batch negatives.

    For each anchor i and each positive j != i (same label)::

        l_ij = -log( exp(s_ij / t) / (exp(s_ij / t) + sum_{k: y_k != y_i} exp(s_ik / t)) )

    Other positives are not negatives. The loss averages l_ij over each anchor's positives, then over
    anchors that have at least one positive and one negative (a batch without any gives 0, with grad).
    With a batch of pairs ``[a_1..a_B, b_1..b_B]`` labelled ``[0..B-1, 0..B-1]`` this is the symmetric
    NT-Xent (SimCLR) loss: cross-entropy over the 2B x 2B similarity matrix, self excluded, target = the
    partner -- i.e. CLIP's symmetric loss where the same-view samples also count as negatives.

    Args:
        temperature: t, fixed (default 0.05), or the initial value when learnable.
        learnable_temperature: learn log(t) (a parameter: give it to the optimizer), clamped to
            [min_temperature, max_temperature].
        mining: None (every pair), or a miner of :mod:`vembed.losses.miners` ("hard", "semihard", "all"):
            only the mined positives and negatives enter the loss.
        mining_margin: the miner's margin in cosine distance (semihard, all).
    """

    name: ClassVar[str] = "infonce"
    batches: ClassVar[str] = "pairs"
    summary: ClassVar[str] = "in-batch negatives, temperature-scaled (pairs or any batch with >= 2 per label)"
    default_temperature: ClassVar[float] = 0.05

    def _pair_losses(self, logits: Tensor, positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
        # log-sum-exp over each anchor's negatives; l_ij = log(1 + exp(neg_lse_i - s_ij)).
        negative_lse = torch.logsumexp(logits.masked_fill(~negatives, _MASKED), dim=1)
        pair_losses = F.softplus(negative_lse[:, None] - logits) * positives
        return pair_losses, positives.any(dim=1) & negatives.any(dim=1)


class SupConLoss(_TemperatureLoss):
    """Supervised contrastive loss (Khosla et al. 2020, the "L_out" form).

    For anchor i with positives P(i) (same label, not i)::

        l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip / t) / sum_{a != i} exp(s_ia / t) )

    The denominator runs over all other samples, positives included. Averaged over anchors with at least
    one positive (0, with grad, when there is none).

    Args:
        temperature: t, fixed (default 0.1, as in the paper), or the initial value when learnable.
        learnable_temperature: learn log(t), clamped to [min_temperature, max_temperature].
        mining: None (every pair), or a miner of :mod:`vembed.losses.miners` ("hard", "semihard", "all"):
            only the mined positives and negatives enter the loss (the denominator runs over them).
        mining_margin: the miner's margin in cosine distance (semihard, all).
    """

    name: ClassVar[str] = "supcon"
    summary: ClassVar[str] = "supervised contrastive: all same-label samples pulled together (P x K batches)"
    default_temperature: ClassVar[float] = 0.1

    def _pair_losses(self, logits: Tensor, positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
        denominator = torch.logsumexp(logits.masked_fill(~(positives | negatives), _MASKED), dim=1)
        return (denominator[:, None] - logits) * positives, positives.any(dim=1)
