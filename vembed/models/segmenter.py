"""Semantic segmentation: a registry backbone's patch tokens → a feature map → a light decoder.

The CLS and register tokens are dropped (their count comes from the registry spec), the remaining
``(H/p) x (W/p)`` patch tokens are laid out as a feature map, and a decoder predicts class logits
that are upsampled (bilinear) to the input size:

- ``linear``: a 1x1 convolution on the last layer's patch features;
- ``fpn``: features of four evenly spaced layers, turned into a 4-level pyramid (strides p/4 .. 2p,
  ViTDet-style), merged top-down (FPN) and summed at the finest level before a 1x1 classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vembed.errors import VembedError
from vembed.models.registry import ModelSpec

DECODERS = ("linear", "fpn")
# families whose position embeddings are interpolated only when asked (any multiple of the patch)
_INTERPOLATE_KWARG = {"clip", "siglip", "vit"}


def fpn_layers(num_layers: int, count: int = 4) -> list[int]:
    """Evenly spaced 1-based layer indices ending at the last layer (12 layers → 3, 6, 9, 12; a model
    with fewer layers repeats some)."""
    return [max(1, round(num_layers * (i + 1) / count)) for i in range(count)]


class LinearDecoder(nn.Module):
    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(in_dim, num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(features[-1])


class FPNDecoder(nn.Module):
    """Simple feature pyramid from one-stride ViT features, FPN top-down merge, 1x1 classifier."""

    def __init__(self, in_dim: int, num_classes: int, *, levels: int = 4, width: int = 256):
        super().__init__()
        if levels != 4:
            raise ValueError("the FPN decoder takes four layers")
        half, quarter = max(in_dim // 2, 8), max(in_dim // 4, 8)
        self.norms = nn.ModuleList(
            nn.GroupNorm(1, in_dim) for _ in range(levels)
        )  # raw layers differ in scale
        self.resample = nn.ModuleList(
            [
                nn.Sequential(  # x4
                    nn.ConvTranspose2d(in_dim, half, 2, stride=2),
                    nn.GroupNorm(1, half),
                    nn.GELU(),
                    nn.ConvTranspose2d(half, quarter, 2, stride=2),
                ),
                nn.ConvTranspose2d(in_dim, half, 2, stride=2),  # x2
                nn.Identity(),  # x1
                nn.MaxPool2d(2, ceil_mode=True),  # x1/2
            ]
        )
        dims = (quarter, half, in_dim, in_dim)
        self.lateral = nn.ModuleList(nn.Conv2d(d, width, 1) for d in dims)
        self.smooth = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(1, width), nn.GELU())
            for _ in dims
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        pyramid = [
            lat(res(norm(f)))
            for f, norm, res, lat in zip(features, self.norms, self.resample, self.lateral, strict=True)
        ]
        for i in range(len(pyramid) - 2, -1, -1):  # top-down: coarse into fine
            pyramid[i] = pyramid[i] + F.interpolate(
                pyramid[i + 1], size=pyramid[i].shape[-2:], mode="nearest"
            )
        size = pyramid[0].shape[-2:]
        fused = sum(
            F.interpolate(sm(p), size=size, mode="bilinear", align_corners=False) if i else sm(p)
            for i, (p, sm) in enumerate(zip(pyramid, self.smooth, strict=True))
        )
        return self.classifier(fused)


class Segmenter(nn.Module):
    """Backbone + decoder; ``forward(pixel_values)`` → logits ``[B, num_classes, H, W]``."""

    def __init__(
        self,
        backbone: nn.Module,
        spec: ModelSpec,
        *,
        num_classes: int,
        decoder: str = "linear",
        class_names: list[str] | None = None,
    ):
        super().__init__()
        if decoder not in DECODERS:
            raise VembedError(
                f"model.decoder: unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}"
            )
        if num_classes < 2:
            raise VembedError(f"segmentation needs at least 2 classes, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise VembedError(f"{len(class_names)} class names for {num_classes} classes")
        self.backbone = backbone
        self.spec = spec
        self.decoder_name = decoder
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        num_layers = int(getattr(_config(backbone), "num_hidden_layers", 1))
        self.layers = fpn_layers(num_layers) if decoder == "fpn" else [num_layers]
        dim = spec.embed_dim
        self.decoder = (
            LinearDecoder(dim, num_classes) if decoder == "linear" else FPNDecoder(dim, num_classes)
        )

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.spec.family_info.has_cls) + self.spec.num_register_tokens

    def feature_maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Patch-token feature maps ``[B, C, H/p, W/p]`` of the decoder's layers (prefix tokens dropped)."""
        h, w = pixel_values.shape[-2] // self.spec.patch_size, pixel_values.shape[-1] // self.spec.patch_size
        kwargs = {"interpolate_pos_encoding": True} if self.spec.family in _INTERPOLATE_KWARG else {}
        wants_hidden = self.decoder_name != "linear"
        out = self.backbone(pixel_values=pixel_values, output_hidden_states=wants_hidden, **kwargs)
        if wants_hidden:
            tokens = [out.hidden_states[i] for i in self.layers[:-1]] + [out.last_hidden_state]
        else:
            tokens = [out.last_hidden_state]
        maps = []
        for t in tokens:
            patches = t[:, self.num_prefix_tokens :]
            if patches.shape[1] != h * w:
                raise VembedError(
                    f"{self.spec.name}: {patches.shape[1]} patch tokens for a {h}x{w} grid; "
                    f"is num_register_tokens ({self.spec.num_register_tokens}) right for this model?"
                )
            maps.append(patches.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w))
        return maps

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        maps = self.feature_maps(pixel_values)
        dtype = next(self.decoder.parameters()).dtype
        logits = self.decoder([m.to(dtype) for m in maps])
        return F.interpolate(
            logits.float(), size=pixel_values.shape[-2:], mode="bilinear", align_corners=False
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @torch.inference_mode()
    def predict(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[B, K, H, W]`` on the CPU for preprocessed images (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            out = self(pixel_values.to(self.device, self.dtype, non_blocking=True))
        finally:
            self.train(was_training)
        return out.float().cpu()


def _config(backbone: nn.Module):
    config = getattr(backbone, "config", None)
    if config is None and hasattr(backbone, "get_base_model"):  # a peft wrapper
        config = backbone.get_base_model().config
    return getattr(config, "vision_config", config)
