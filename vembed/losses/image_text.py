"""Image–text losses: ``clip`` (symmetric InfoNCE) and ``siglip`` (pairwise sigmoid).

Both take the L2-normalised image and text embeddings of a batch of matching pairs (row ``i`` of each is
one pair) and own a learnable temperature (``siglip`` also a bias). On several processes each rank's
images and texts are scored against the texts and images of every rank (the differentiable gather of
:mod:`vembed.losses.distributed`), so the negatives are the whole global batch:

- ``clip``: ``s = exp(log_scale)`` (capped at 100, as CLIP does); ``L = (CE(s·I Tᵀ, diag) + CE(s·T Iᵀ,
  diag)) / 2``, averaged over this rank's pairs.
- ``siglip``: ``z_ij = t·(i·t_j) + b``, ``y_ij = +1`` for a pair, ``-1`` otherwise;
  ``L = -(1/n) Σ_i Σ_j log σ(y_ij z_ij)`` over this rank's ``n`` images and all texts (Zhai et al. 2023,
  initialised at ``t = 10, b = -10``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vembed.errors import VembedError
from vembed.losses.distributed import gather_with_grad, rank_and_world_size

__all__ = ["PAIR_LOSSES", "ClipLoss", "SigLipLoss", "build_pair_loss"]

MAX_SCALE = 100.0


def _check(image: Tensor, text: Tensor) -> None:
    if image.ndim != 2 or image.shape != text.shape:
        raise VembedError(
            f"image-text loss: image and text embeddings must be [N, D] of the same shape, got "
            f"{tuple(image.shape)} and {tuple(text.shape)}"
        )


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over image→text and text→image with a learnable logit scale (1 / temperature)."""

    name: ClassVar[str] = "clip"

    def __init__(self, temperature: float = 0.07, learnable_temperature: bool = True):
        super().__init__()
        if not temperature > 0:
            raise VembedError(f"loss 'clip': temperature must be > 0, got {temperature}")
        value = torch.tensor(math.log(1.0 / temperature))
        self.learnable_temperature = bool(learnable_temperature)
        if self.learnable_temperature:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp().clamp(max=MAX_SCALE)

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        _check(image, text)
        image, text = image.float(), text.float()
        rank, _ = rank_and_world_size()
        all_text, all_image = gather_with_grad(text), gather_with_grad(image)
        targets = torch.arange(len(image), device=image.device) + rank * len(image)
        scale = self.scale
        to_text = F.cross_entropy(scale * image @ all_text.T, targets)
        to_image = F.cross_entropy(scale * text @ all_image.T, targets)
        return (to_text + to_image) / 2

    def model_logits(self) -> dict[str, float]:
        """The values a transformers CLIP model keeps (``logit_scale`` = log of the scale)."""
        return {"logit_scale": float(self.scale.log())}


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss with a learnable temperature ``t`` and bias ``b``."""

    name: ClassVar[str] = "siglip"

    def __init__(self, temperature: float = 0.1, bias: float = -10.0, learnable_temperature: bool = True):
        super().__init__()
        if not temperature > 0:
            raise VembedError(f"loss 'siglip': temperature must be > 0, got {temperature}")
        scale, bias_ = torch.tensor(math.log(1.0 / temperature)), torch.tensor(float(bias))
        self.learnable_temperature = bool(learnable_temperature)
        if self.learnable_temperature:
            self.log_scale, self.bias = nn.Parameter(scale), nn.Parameter(bias_)
        else:
            self.register_buffer("log_scale", scale)
            self.register_buffer("bias", bias_)

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        _check(image, text)
        image, text = image.float(), text.float()
        rank, _ = rank_and_world_size()
        all_text = gather_with_grad(text)
        logits = self.scale * image @ all_text.T + self.bias
        signs = -torch.ones_like(logits)
        rows = torch.arange(len(image), device=image.device)
        signs[rows, rows + rank * len(image)] = 1.0
        return -F.logsigmoid(signs * logits).sum() / len(image)

    def model_logits(self) -> dict[str, float]:
        """The values a transformers SigLIP model keeps (``logit_scale`` = log t, ``logit_bias`` = b)."""
        return {"logit_scale": float(self.log_scale), "logit_bias": float(self.bias)}


PAIR_LOSSES: dict[str, type[nn.Module]] = {"clip": ClipLoss, "siglip": SigLipLoss}


def build_pair_loss(name: str, **options) -> nn.Module:
    """``clip`` or ``siglip`` with its options (``temperature``, ``learnable_temperature``, ``bias``)."""
    import inspect

    key = name.strip().lower()
    if key not in PAIR_LOSSES:
        raise VembedError(f"train.loss={name!r}: image-text losses are {', '.join(PAIR_LOSSES)}")
    cls = PAIR_LOSSES[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise VembedError(
            f"unknown option {unknown[0]!r} for loss '{key}'; valid options: {', '.join(accepted)}"
        )
    return cls(**options)
