"""Classification loss: a linear (or cosine) classifier on the embedding + cross-entropy.

The linear classifier first standardises its input (``standardize``, on by default): a non-affine
BatchNorm with running statistics, as linear evaluation in DINO and MAE does. Embeddings of a frozen
backbone are often nearly collinear (a mean cosine of 0.99 on a random-init ViT), and a linear layer on
the raw features then learns nothing in a few hundred steps. The statistics are folded into the saved
head's weights (:meth:`vembed.models.heads.ClassifierHead.from_loss`), so ``classify`` and the export
remain one linear layer on the model's embedding.
"""

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
    check_width,
    float32_forward,
)
from vembed.models.heads import Standardize, classifier_logits

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
        standardize: standardise the embeddings (running mean and variance, no learnt scale or shift)
            before the linear classifier; default: on for the linear classifier. A cosine classifier
            (``normalized``) cannot fold it into one linear layer, so it takes ``standardize=False``.
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
        standardize: bool | None = None,
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
        if standardize is not None and not isinstance(standardize, bool):
            raise VembedError(f"loss 'ce': standardize must be true or false, got {standardize!r}")
        if standardize and self.normalized:
            raise VembedError(
                "loss 'ce': standardize=true needs the linear classifier (normalized=false): a cosine "
                "classifier on standardised features is not one linear layer on the embedding"
            )
        self.standardizer = (
            Standardize(embed_dim) if standardize is not False and not self.normalized else None
        )
        self.classifier = nn.Linear(embed_dim, num_classes, bias=not self.normalized)

    def logits(self, embeddings: Tensor) -> Tensor:
        if self.standardizer is not None:
            embeddings = self.standardizer(embeddings)
        return classifier_logits(embeddings, self.classifier, normalized=self.normalized, scale=self.scale)

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels, self.name)
        check_width(embeddings, self.embed_dim, self.name, "the classifier")
        check_class_labels(labels, self.num_classes, self.name)
        return F.cross_entropy(self.logits(embeddings), labels.long(), label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, normalized={self.normalized}, "
            f"scale={self.scale}, label_smoothing={self.label_smoothing}, "
            f"standardize={self.standardizer is not None}"
        )
