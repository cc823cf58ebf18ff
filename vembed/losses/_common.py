"""Helpers shared by the loss modules: input checks and a float32 forward."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from vembed.errors import VembedError

_F = TypeVar("_F", bound=Callable[..., Tensor])


def float32_forward(forward: _F) -> _F:
    """Run a loss ``forward(embeddings, labels)`` in float32 with autocast disabled.

    Similarities divided by a small temperature (or multiplied by a margin scale of 30) lose too much
    precision in bfloat16, so every loss computes in float32 whatever the model's autocast dtype is.
    """

    @functools.wraps(forward)
    def wrapper(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            if embeddings.is_floating_point() and embeddings.dtype != torch.float32:
                embeddings = embeddings.float()
            return forward(self, embeddings, labels)

    return wrapper  # type: ignore[return-value]


def check_batch(embeddings: Tensor, labels: Tensor, loss_name: str) -> None:
    """Raise a VembedError unless ``embeddings`` is [N, D] floating and ``labels`` is [N] integer."""
    if not isinstance(embeddings, Tensor) or not isinstance(labels, Tensor):
        raise VembedError(f"loss '{loss_name}': embeddings and labels must be torch tensors")
    if embeddings.dim() != 2:
        raise VembedError(
            f"loss '{loss_name}': embeddings must have shape [N, D], got {tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise VembedError(f"loss '{loss_name}': embeddings must be floating point, got {embeddings.dtype}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise VembedError(
            f"loss '{loss_name}': labels must have shape [N] = [{embeddings.shape[0]}] to match the "
            f"embeddings, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise VembedError(f"loss '{loss_name}': labels must be an integer tensor, got {labels.dtype}")


def normalize(embeddings: Tensor) -> Tensor:
    """L2-normalise rows (defensive: the model already normalises, the math here assumes it)."""
    return F.normalize(embeddings, p=2.0, dim=1, eps=1e-12)


def zero_with_grad(embeddings: Tensor) -> Tensor:
    """A scalar 0 connected to the graph, for batches without a single valid pair or triplet."""
    return embeddings.sum() * 0.0


def check_positive(value: float, what: str, loss_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise VembedError(f"loss '{loss_name}': {what} must be a number > 0, got {value!r}")
    return float(value)


def check_non_negative(value: float, what: str, loss_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise VembedError(f"loss '{loss_name}': {what} must be a number >= 0, got {value!r}")
    return float(value)


def check_dims(embed_dim: int, num_classes: int, loss_name: str) -> tuple[int, int]:
    for what, value, low in (("embed_dim", embed_dim, 1), ("num_classes", num_classes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise VembedError(f"loss '{loss_name}': {what} must be an integer >= {low}, got {value!r}")
    return embed_dim, num_classes


def check_class_labels(labels: Tensor, num_classes: int, loss_name: str) -> None:
    """Proxy/classifier losses index a table with the labels: catch out-of-range ids with a clear message
    instead of a CUDA device-side assert."""
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise VembedError(
            f"loss '{loss_name}': labels must be class ids in [0, {num_classes - 1}] (num_classes={num_classes}),"
            f" got values in [{low}, {high}]"
        )


def check_width(embeddings: Tensor, embed_dim: int, loss_name: str, what: str) -> None:
    """Raise unless the embeddings have ``embed_dim`` dims, the width of ``what`` (proxies, classifier)."""
    if embeddings.shape[1] != embed_dim:
        raise VembedError(
            f"loss '{loss_name}': embeddings have {embeddings.shape[1]} dims, {what} {embed_dim} (embed_dim)"
        )
