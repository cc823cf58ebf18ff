"""Angular-margin losses over learnable class proxies: ArcFace and CosFace.

Each class owns a proxy vector (``proxies``: [num_classes, embed_dim], normalised in the forward); the
logits are ``scale * cos(embedding, proxy)`` with a margin applied to the true class, then cross-entropy.
The proxies are parameters: pass ``loss.parameters()`` to the optimizer (usually with a higher learning
rate than the backbone) and save them with the checkpoint to resume.

Default scale is 30 for both: large enough for the softmax to saturate for thousands of classes
(AdaCos' fixed-scale rule sqrt(2) * ln(C - 1) is ~13 for 10k classes), and steadier when fine-tuning a
pretrained backbone than the 64 used to train face models from scratch.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vembed.losses._common import (
    check_batch,
    check_class_labels,
    check_dims,
    check_non_negative,
    check_positive,
    check_width,
    float32_forward,
    normalize,
)

__all__ = ["ArcFaceLoss", "CosFaceLoss"]

# cos(theta) is kept inside [-1 + eps, 1 - eps] so that sin(theta) = sqrt(1 - cos^2) has a finite gradient.
_COS_EPS = 1e-6


class _ProxyMarginLoss(nn.Module):
    needs_num_classes: ClassVar[bool] = True
    batches: ClassVar[str] = "any"  # class labels: any shuffled batch works
    name: ClassVar[str] = ""

    def __init__(self, embed_dim: int, num_classes: int, *, scale: float, margin: float) -> None:
        super().__init__()
        self.embed_dim, self.num_classes = check_dims(embed_dim, num_classes, self.name)
        self.scale = check_positive(scale, "scale", self.name)
        self.margin = check_non_negative(margin, "margin", self.name)
        self.proxies = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.normal_(self.proxies)

    def cosine(self, embeddings: Tensor) -> Tensor:
        """[N, num_classes] cosine similarity between embeddings and (normalised) class proxies."""
        return normalize(embeddings) @ normalize(self.proxies).T

    def _target_logit(self, cos_target: Tensor) -> Tensor:
        raise NotImplementedError

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels, self.name)
        check_width(embeddings, self.embed_dim, self.name, "the proxies")
        check_class_labels(labels, self.num_classes, self.name)
        cos = self.cosine(embeddings)
        index = labels.long()[:, None]
        target = self._target_logit(cos.gather(1, index))
        logits = cos.scatter(1, index, target) * self.scale
        return F.cross_entropy(logits, labels.long())

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, scale={self.scale}, "
            f"margin={self.margin}"
        )


class ArcFaceLoss(_ProxyMarginLoss):
    """ArcFace (Deng et al. 2019): additive angular margin, target logit ``s * cos(theta + m)``.

    ``cos(theta + m)`` is only monotonic for ``theta + m <= pi``. Beyond that (``cos(theta) <= cos(pi - m)``)
    the original replaces it with the CosFace-like ``cos(theta) - m * sin(m)``; with ``easy_margin=True``
    the margin is applied only where ``cos(theta) > 0`` (and the plain cosine used otherwise).

    Args:
        embed_dim, num_classes: proxy table size.
        scale: s (default 30). margin: m in radians (default 0.5). easy_margin: see above.
    """

    name: ClassVar[str] = "arcface"
    summary: ClassVar[str] = "additive angular margin over learnable class proxies (needs class labels)"

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        scale: float = 30.0,
        margin: float = 0.5,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(embed_dim, num_classes, scale=scale, margin=margin)
        self.easy_margin = bool(easy_margin)

    def _target_logit(self, cos_target: Tensor) -> Tensor:
        m = self.margin
        cos = cos_target.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS)
        sin = torch.sqrt(1.0 - cos * cos)
        phi = cos * math.cos(m) - sin * math.sin(m)  # cos(theta + m)
        if self.easy_margin:
            return torch.where(cos > 0, phi, cos)
        threshold = math.cos(math.pi - m)
        return torch.where(cos > threshold, phi, cos - math.sin(math.pi - m) * m)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", easy_margin={self.easy_margin}"


class CosFaceLoss(_ProxyMarginLoss):
    """CosFace / large-margin cosine loss (Wang et al. 2018): target logit ``s * (cos(theta) - m)``.

    Args:
        embed_dim, num_classes: proxy table size.
        scale: s (default 30). margin: m, subtracted from the target cosine (default 0.35).
    """

    name: ClassVar[str] = "cosface"
    summary: ClassVar[str] = "additive cosine margin over learnable class proxies (needs class labels)"

    def __init__(
        self, embed_dim: int, num_classes: int, *, scale: float = 30.0, margin: float = 0.35
    ) -> None:
        super().__init__(embed_dim, num_classes, scale=scale, margin=margin)

    def _target_logit(self, cos_target: Tensor) -> Tensor:
        return cos_target - self.margin
