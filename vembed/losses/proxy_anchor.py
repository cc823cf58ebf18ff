"""Proxy-anchor loss (Kim et al. 2020, "Proxy Anchor Loss for Deep Metric Learning").

The definition of pytorch-metric-learning's ``ProxyAnchorLoss`` (its values, tested on fixed inputs): one
learnable proxy per class; with ``c = cos(x, proxy)``::

    loss = 1/|P+| * sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (c(x, p) - margin)))
         + 1/|P|  * sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (c(x, p) + margin)))

``P+``: the proxies of the classes in the batch, ``X_p+`` / ``X_p-``: the batch's embeddings of that class
/ of the others. The proxies learn at their own rate: ``proxy_lr_scale`` x ``train.head_lr`` (default 10,
i.e. 100 x ``train.lr`` with the default head_lr, the paper's ratio).
"""

from __future__ import annotations

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
    float32_forward,
    normalize,
    zero_with_grad,
)
from vembed.losses.multi_similarity import log1p_sum_exp

__all__ = ["ProxyAnchorLoss"]


class ProxyAnchorLoss(nn.Module):
    """Proxy-anchor loss; see the module docstring.

    Args:
        embed_dim, num_classes: proxy table size (``proxies`` [num_classes, embed_dim]).
        margin: delta (0.1), alpha: the scale (32), as in the paper and PML.
        proxy_lr_scale: the proxies' learning rate as a multiple of ``train.head_lr`` (read by the
            optimiser from ``proxies.lr_scale``).
    """

    needs_num_classes: ClassVar[bool] = True
    batches: ClassVar[str] = "any"
    name: ClassVar[str] = "proxy_anchor"
    summary: ClassVar[str] = "proxy anchor: a proxy per class, fast and data-efficient (needs class labels)"

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        margin: float = 0.1,
        alpha: float = 32.0,
        proxy_lr_scale: float = 10.0,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_classes = check_dims(embed_dim, num_classes, self.name)
        self.margin = check_non_negative(margin, "margin", self.name)
        self.alpha = check_positive(alpha, "alpha", self.name)
        self.proxies = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")  # the paper's / PML's initialisation
        self.proxies.lr_scale = check_positive(proxy_lr_scale, "proxy_lr_scale", self.name)

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels, self.name)
        check_class_labels(labels, self.num_classes, self.name)
        if embeddings.shape[0] == 0:
            return zero_with_grad(embeddings)
        cos = normalize(embeddings) @ F.normalize(self.proxies, dim=1).T  # [N, C]
        positive = F.one_hot(labels.long(), self.num_classes).bool()  # [N, C]
        # per proxy (a row of cos.T): its class's embeddings, and the others'
        pos = log1p_sum_exp(-self.alpha * (cos.T - self.margin), positive.T)
        neg = log1p_sum_exp(self.alpha * (cos.T + self.margin), ~positive.T)
        with_positives = positive.any(dim=0)
        return pos[with_positives].sum() / with_positives.sum().clamp(min=1) + neg.mean()

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, margin={self.margin}, alpha={self.alpha}"
