"""Matryoshka representation learning: train several embedding widths with one loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor, nn

from vembed.errors import VembedError
from vembed.losses._common import check_batch, normalize

__all__ = ["MatryoshkaLoss"]


class MatryoshkaLoss(nn.Module):
    """``sum_d w_d * loss(normalize(embeddings[:, :d]), labels)`` over the widths ``dims``.

    Training this way makes every prefix ``embeddings[:, :d]`` (re-normalised) a usable embedding, so the
    exported model can be truncated to any of ``dims``. List the full width too if it should be trained
    directly: only the listed widths enter the loss.

    Only for pair-based losses (infonce, supcon, triplet). Proxy/classifier losses (arcface, cosface, ce)
    own a [num_classes, embed_dim] table sized for one width and are refused.

    Args:
        loss: the wrapped pair-based loss.
        dims: distinct positive widths, e.g. ``(64, 128, 256, 768)``.
        weights: one non-negative weight per width; default all 1.
    """

    needs_num_classes: ClassVar[bool] = False
    name: ClassVar[str] = "matryoshka"

    def __init__(self, loss: nn.Module, dims: Sequence[int], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if getattr(loss, "needs_num_classes", False):
            raise VembedError(
                f"matryoshka_dims cannot be used with loss '{getattr(loss, 'name', type(loss).__name__)}': "
                "it owns class proxies / a classifier for one embedding width; use infonce, supcon or triplet"
            )
        dims = list(dims) if not isinstance(dims, (str, bytes)) else []
        if not dims:
            raise VembedError("matryoshka_dims must list at least one embedding width, e.g. [64, 128, 256]")
        for d in dims:
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise VembedError(f"matryoshka_dims must be positive integers, got {d!r} in {dims}")
        if len(set(dims)) != len(dims):
            raise VembedError(f"matryoshka_dims has repeated widths: {dims}")
        if weights is None:
            weights = [1.0] * len(dims)
        weights = list(weights)
        if len(weights) != len(dims):
            raise VembedError(
                f"matryoshka_weights has {len(weights)} values for {len(dims)} matryoshka_dims {dims}"
            )
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise VembedError(f"matryoshka_weights must be numbers >= 0, got {w!r} in {weights}")
        self.loss = loss
        self.dims = tuple(dims)
        self.weights = tuple(float(w) for w in weights)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels, self.name)
        width = embeddings.shape[1]
        too_wide = [d for d in self.dims if d > width]
        if too_wide:
            raise VembedError(f"matryoshka_dims {too_wide} exceed the embedding width {width}")
        total: Tensor | None = None
        for d, w in zip(self.dims, self.weights, strict=True):
            term = w * self.loss(normalize(embeddings[:, :d]), labels)
            total = term if total is None else total + term
        assert total is not None
        return total

    def extra_repr(self) -> str:
        return f"dims={self.dims}, weights={self.weights}"
