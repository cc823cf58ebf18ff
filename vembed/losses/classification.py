"""Classification loss: a linear (or cosine) classifier on the embedding + cross-entropy."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from vembed.errors import VembedError
from vembed.losses._common import (
    check_batch,
    check_class_labels,
    check_dims,
    check_positive,
    float32_forward,
)
from vembed.models.heads import classifier_logits

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy through a classifier head owned by the loss.

    ``normalized=False`` (default): ``logits = W x + b``. ``normalized=True``: a cosine classifier,
    ``logits = scale * cos(x, w_c)`` without bias ("normalised softmax", Zhai & Wu 2018, whose
    temperature 0.05 is the default scale 20). The classifier is a parameter of the loss: give
    ``loss.parameters()`` to the optimizer (it is not part of the embedding model).

    Args:
        embed_dim, num_classes: classifier size.
        normalized: cosine classifier instead of a linear one. scale: logit scale when normalized.
        label_smoothing: in [0, 1), as in ``torch.nn.functional.cross_entropy``.
    """

    needs_num_classes: ClassVar[bool] = True
    batches: ClassVar[str] = "any"  # class labels: any shuffled batch works
    name: ClassVar[str] = "ce"
    summary: ClassVar[str] = "classifier + softmax cross-entropy (needs class labels)"
    trains_classifier: ClassVar[bool] = True  # validation also reports its top1 / top5

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        normalized: bool = False,
        scale: float = 20.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_classes = check_dims(embed_dim, num_classes, self.name)
        self.normalized = bool(normalized)
        self.scale = check_positive(scale, "scale", self.name)
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
            raise VembedError(
                f"loss 'ce': label_smoothing must be a number in [0, 1), got {label_smoothing!r}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise VembedError(f"loss 'ce': label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.classifier = nn.Linear(embed_dim, num_classes, bias=not self.normalized)

    def logits(self, embeddings: Tensor) -> Tensor:
        return classifier_logits(embeddings, self.classifier, normalized=self.normalized, scale=self.scale)

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels, self.name)
        if embeddings.shape[1] != self.embed_dim:
            raise VembedError(
                f"loss 'ce': embeddings have {embeddings.shape[1]} dims, the classifier {self.embed_dim} "
                "(embed_dim)"
            )
        check_class_labels(labels, self.num_classes, self.name)
        return F.cross_entropy(self.logits(embeddings), labels.long(), label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, normalized={self.normalized}, "
            f"scale={self.scale}, label_smoothing={self.label_smoothing}"
        )
