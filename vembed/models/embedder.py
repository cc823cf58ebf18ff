"""The embedding model: backbone → pooling → optional projection → L2 normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vembed.errors import VembedError
from vembed.models.precision import BackboneModule
from vembed.models.registry import ModelSpec

POOLINGS = ("cls", "mean", "cls+mean", "gem", "pooler")


def truncate_embeddings(embeddings: torch.Tensor, dim: int, *, normalize: bool = True) -> torch.Tensor:
    """The first ``dim`` components of each embedding (a Matryoshka width), re-normalised to unit length.

    ``normalize=False`` only slices. This is the one definition of a truncated width: the model's
    ``truncate_dim``, ``--dims`` in evaluation and the store all use it.
    """
    if not 1 <= dim <= embeddings.shape[-1]:
        raise VembedError(f"cannot truncate {embeddings.shape[-1]}-d embeddings to {dim} dims")
    out = embeddings[..., :dim]
    return F.normalize(out, dim=-1) if normalize else out


class GeM(nn.Module):
    """Generalised-mean pooling over patch tokens with a learnable exponent p, for signed features.

    Transformer tokens are LayerNorm'd, about half of them negative, so the classic
    ``mean(clamp(x, eps)^p)^(1/p)`` would drop every negative value. Here the power mean is taken over
    the tokens shifted to be positive: with ``m = min over tokens - eps`` (per image and channel),
    ``gem(x) = m + mean((x - m)^p)^(1/p)``. p = 1 gives the mean, large p tends to the max, and
    ``gem(x + c) = gem(x) + c``.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        x = tokens.float()
        m = x.amin(dim=1, keepdim=True) - self.eps
        shifted = x - m
        top = shifted.amax(dim=1, keepdim=True).clamp(min=1e-12)  # divided out: no overflow for large p
        mean = (shifted / top).pow(p).mean(dim=1).pow(1.0 / p) * top.squeeze(1)
        return (mean + m.squeeze(1)).to(tokens.dtype)


class Embedder(BackboneModule):
    """A vision backbone turned into an image embedding model.

    ``forward(pixel_values)`` returns embeddings with gradients (training); ``encode`` is the one
    inference path used by validation, ``eval``, ``embed`` and ``search``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        spec: ModelSpec,
        *,
        pooling: str | None = None,
        projection_dim: int | None = None,
        normalize: bool = True,
        truncate_dim: int | None = None,
    ):
        super().__init__()
        pooling = pooling or spec.pooling
        if pooling not in POOLINGS:
            raise VembedError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if pooling in ("cls", "cls+mean") and not spec.family_info.has_cls:
            raise VembedError(
                f"pooling {pooling!r} needs a CLS token, which {spec.family} models lack; use 'pooler' or 'mean'"
            )
        if pooling == "pooler" and not spec.family_info.has_pooler:
            raise VembedError(
                f"pooling 'pooler' needs a pooler layer, which vembed loads {spec.family} models without; "
                "use 'cls' or 'mean'"
            )
        self.backbone = backbone
        self.spec = spec
        self.pooling = pooling
        self.normalize = normalize
        self.gem = GeM() if pooling == "gem" else None
        width = spec.embed_dim * (2 if pooling == "cls+mean" else 1)
        self.feature_dim = width
        self.projection = nn.Linear(width, projection_dim) if projection_dim else None
        self.full_dim = projection_dim or width
        if truncate_dim is not None and not 1 <= truncate_dim <= self.full_dim:
            raise VembedError(
                f"model.truncate_dim is {truncate_dim}, but the model's embeddings are {self.full_dim}-d"
            )
        self.truncate_dim = truncate_dim if truncate_dim != self.full_dim else None
        self.embed_dim = self.truncate_dim or self.full_dim

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.spec.family_info.has_cls) + self.spec.num_register_tokens

    def identity(self) -> dict:
        """What ``vembed.json`` records about the embedding (see :func:`vembed.models.factory.save_model`)."""
        return {
            "pooling": self.pooling,
            "projection_dim": self.projection.out_features if self.projection is not None else None,
            "normalize": self.normalize,
            "embed_dim": self.embed_dim,
            "truncate_dim": self.truncate_dim,
            "num_prefix_tokens": self.num_prefix_tokens,
        }

    def own_weights(self) -> dict[str, torch.Tensor]:
        """The weights beyond the backbone (projection, GeM's p): ``vembed_head.safetensors``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def pool(self, outputs) -> torch.Tensor:
        """Pool the backbone's outputs into one vector per image (before projection)."""
        if self.pooling == "pooler":
            return outputs.pooler_output
        hidden = outputs.last_hidden_state
        patches = hidden[:, self.num_prefix_tokens :]
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            return patches.mean(dim=1)
        if self.pooling == "gem":
            return self.gem(patches)
        return torch.cat([hidden[:, 0], patches.mean(dim=1)], dim=-1)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, before projection and normalisation."""
        options = self.spec.family_info.forward_options
        return self.pool(self.backbone(pixel_values=pixel_values, **options))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Projection and normalisation applied to pooled features (cacheable for frozen training)."""
        if self.projection is not None:
            features = self.projection(features.to(self.projection.weight.dtype))
        if self.truncate_dim is not None:
            return truncate_embeddings(features.float(), self.truncate_dim, normalize=self.normalize)
        return F.normalize(features.float(), dim=-1) if self.normalize else features.float()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, *, pooled: bool = False) -> torch.Tensor:
        """Embeddings for a batch of preprocessed images: float32 ``[N, D]`` on the CPU.

        ``pooled=True`` stops before the head: pooled backbone features ``[N, feature_dim]``
        (what a frozen-backbone run caches once and trains its head on).
        """
        with self.evaluating():
            pixels = pixel_values.to(self.device, self.dtype, non_blocking=True)
            out = self.features(pixels) if pooled else self(pixels)
        return out.float().cpu()
