"""Semantic segmentation: a registry backbone's patch tokens → a feature map → a light decoder.

The CLS and register tokens are dropped (their count comes from the registry spec), the remaining
``(H/p) x (W/p)`` patch tokens are laid out as a feature map, and a decoder predicts class logits
that are upsampled (bilinear) to the input size:

- ``linear``: a 1x1 convolution on the last layer's patch features;
- ``fpn``: features of four evenly spaced layers, turned into a 4-level pyramid (strides p/4 .. 2p,
  ViTDet-style), merged top-down (FPN) and summed at the finest level before a 1x1 classifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vembed.console import log
from vembed.errors import VembedError
from vembed.models.loader import HEAD_WEIGHTS, VEMBED_CONFIG, LoadedModel, load_model
from vembed.models.precision import BackboneModule, resolve_device, resolve_dtype
from vembed.models.registry import ModelSpec

DECODERS = ("linear", "fpn")
# families whose position embeddings are interpolated only when asked (any multiple of the patch)
_INTERPOLATE_KWARG = {"clip", "siglip", "vit"}


LOGITS_ATOL = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2e-1}  # export check of the decoder


def fit_to_patch(size: int, patch_size: int) -> int:
    """The nearest multiple of ``patch_size`` (at least one patch)."""
    return max(patch_size, round(size / patch_size) * patch_size)


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


class Segmenter(BackboneModule):
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

    def head(self) -> SegmenterHead:
        """The decoder as a head that saves itself (:func:`vembed.models.factory.save_model`)."""
        return SegmenterHead(
            self.decoder_name,
            self.class_names,
            self.layers,
            {k: v.detach().float().cpu().contiguous() for k, v in self.decoder.state_dict().items()},
        )

    def identity(self) -> dict:
        """What ``vembed.json`` records about the encoder (an embedding model of the same backbone)."""
        spec = self.spec
        return {
            "pooling": spec.pooling,
            "normalize": True,
            "embed_dim": spec.embed_dim,
            "num_prefix_tokens": self.num_prefix_tokens,
        }

    def own_weights(self) -> dict[str, torch.Tensor]:
        """Nothing beyond the backbone but the decoder, which :meth:`head` saves."""
        return {}

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

    @torch.inference_mode()
    def predict(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[B, K, H, W]`` on the CPU for preprocessed images (eval mode)."""
        with self.evaluating():
            out = self(pixel_values.to(self.device, self.dtype, non_blocking=True))
        return out.float().cpu()


def _config(backbone: nn.Module):
    config = getattr(backbone, "config", None)
    if config is None and hasattr(backbone, "get_base_model"):  # a peft wrapper
        config = backbone.get_base_model().config
    return getattr(config, "vision_config", config)


@dataclass
class SegmenterHead:
    """A segmentation decoder as a saved head: ``vembed.json: task_head`` says
    ``{"kind": "segmenter", "decoder", "num_classes", "class_names", "layers"}``; its weights are the
    decoder's ``state_dict`` (``task_head.*`` in ``vembed_head.safetensors``)."""

    kind: ClassVar[str] = "segmenter"
    decoder: str
    class_names: list[str]
    layers: list[int]
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "decoder": self.decoder,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "layers": list(self.layers),
        }

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    @classmethod
    def from_saved(cls, config: dict, weights: dict[str, torch.Tensor], *, where: str) -> SegmenterHead:
        try:
            names = [str(n) for n in config["class_names"]]
            return cls(
                str(config["decoder"]), names, [int(i) for i in config.get("layers", [])], dict(weights)
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VembedError(f"{where}: the segmenter task_head is incomplete ({exc})") from None

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> SegmenterHead | None:
        """The decoder saved with a model, None when its ``task_head`` is none (or another head's)."""
        entry = loaded.task_head
        if not entry or entry.get("kind") != cls.kind:
            return None
        return cls.from_saved(entry, loaded.task_head_state, where=f"{loaded.ref.name}/{VEMBED_CONFIG}")

    def check_export(self, source: str | Path, out: Path, dtype: str) -> dict[str, float]:
        """Max abs difference between the source's and the export's logits on a fixed batch."""
        before, after = (create_segmenter(m, device="cpu", dtype="float32") for m in (source, out))
        size = before.spec.image_size
        batch = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        diff = float((before.predict(batch) - after.predict(batch)).abs().max())
        if diff > LOGITS_ATOL[dtype]:
            raise VembedError(
                f"the exported segmentation model's logits differ from {source}'s by {diff:.2e} "
                f"(allowed {LOGITS_ATOL[dtype]:.0e}); do not use {out}"
            )
        return {"segmentation_max_abs_diff": diff}

    def card(self, model_config: dict) -> tuple[str, str]:
        """The model card's section on the decoder: vembed commands and the decoder's weights."""
        head, config = self.config(), model_config
        names = ", ".join(head["class_names"][:12]) + (", ..." if head["num_classes"] > 12 else "")
        size = config["preprocessing"]["image_size"]
        linear = (
            "\nThe decoder is one 1x1 convolution on the last layer's patch tokens (prefix tokens dropped):\n\n"
            "```python\n"
            "from safetensors.torch import load_file\n"
            'w = load_file(f"{path}/vembed_head.safetensors")\n'
            f"tokens = out.last_hidden_state[:, {config['num_prefix_tokens']}:]          # [N, h*w, C]\n"
            'logits = tokens @ w["task_head.classifier.weight"][:, :, 0, 0].T + w["task_head.classifier.bias"]\n'
            "# reshape to [N, h, w, K], upsample (bilinear) to the input size, argmax over K\n"
            "```\n"
            if head["decoder"] == "linear"
            else "\nThe FPN decoder (layers "
            + ", ".join(str(i) for i in head["layers"])
            + ") is vembed's `FPNDecoder`; load the whole model with vembed.\n"
        )
        return (
            "",
            f"""
    ## Segmentation

    This folder is also a semantic segmentation model: the encoder above plus a `{head["decoder"]}` decoder
    (`vembed_head.safetensors`, keys `task_head.*`) for {head["num_classes"]} classes ({names}),
    input {size} x {size} px (the whole image resized, no crop).

    With vembed: `vembed predict-masks PATH images/ --out masks/ --overlay`,
    `vembed eval segmentation --model PATH --data val.jsonl --corruptions all`, or in Python
    `vembed.models.segmenter.create_segmenter(PATH)`.
    {linear}""",
        )


def saved_segmenter_head(model: str | Path) -> SegmenterHead | None:
    """The decoder saved with ``model`` (a folder or run directory; no weights loaded), else None."""
    try:
        return SegmenterHead.from_loaded(load_model(model, weights=False))
    except VembedError:
        return None


def fit_spec(spec: ModelSpec, image_size: int | None = None) -> ModelSpec:
    """The spec at ``image_size`` rounded to a multiple of the patch size (said when it changes); no
    centre crop (a segmentation input is the whole image)."""
    size = image_size or spec.image_size
    fitted = fit_to_patch(size, spec.patch_size)
    if fitted != size:
        log(
            f"[yellow]note:[/] model.image_size={size} is not a multiple of the patch size "
            f"{spec.patch_size}; using {fitted}"
        )
    return spec.replace(image_size=fitted, crop_pct=1.0)


def create_segmenter(
    model: str | Path,
    options=None,
    *,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    decoder: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> Segmenter:
    """A segmenter for ``model`` on ``options.device`` / ``options.dtype`` (``options``: any object with
    the :class:`vembed.models.factory.ModelOptions` fields, e.g. ``model.*`` settings).

    A saved segmentation model brings back its decoder, classes and input size; a class count given
    here that differs from the saved one is an error. Any other model gets a new decoder (``decoder``,
    default ``options.decoder``) for ``num_classes`` classes. ``device`` / ``dtype`` override the options'.
    """
    revision, attention = getattr(options, "revision", None), getattr(options, "attention", "auto")
    return build_segmenter(
        load_model(str(model), revision=revision, attention=attention),
        num_classes=num_classes,
        class_names=class_names,
        decoder=decoder or getattr(options, "decoder", "linear"),
        image_size=getattr(options, "image_size", None),
        device=device or getattr(options, "device", "auto"),
        dtype=dtype or getattr(options, "dtype", "auto"),
    )


def build_segmenter(
    loaded: LoadedModel,
    *,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    decoder: str = "linear",
    image_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> Segmenter:
    """A :class:`Segmenter` from a :func:`load_model` result (its saved decoder loaded, if any)."""
    name = loaded.ref.name
    head = SegmenterHead.from_loaded(loaded)
    if head:
        saved_names = head.class_names
        if num_classes is not None and num_classes != len(saved_names):
            raise VembedError(
                f"{name}: the model has {len(saved_names)} classes but the data has {num_classes} "
                "(the class count differs between the run and the data)"
            )
        decoder, class_names, num_classes = head.decoder, saved_names, len(saved_names)
    elif num_classes is None:
        raise VembedError(
            f"{name} is not a segmentation model (its vembed.json has no segmenter task_head); "
            "give a run's final/ or an export of a train.task=segmentation run"
        )
    spec = fit_spec(loaded.spec, None if head else image_size)
    segmenter = Segmenter(
        loaded.backbone, spec, num_classes=num_classes, decoder=decoder, class_names=class_names
    )
    if head:
        try:
            segmenter.decoder.load_state_dict(head.state)
        except RuntimeError as exc:
            raise VembedError(f"{name}/{HEAD_WEIGHTS}: does not match a {decoder} decoder ({exc})") from None
    device_ = resolve_device(device)
    return segmenter.to(device=device_, dtype=resolve_dtype(dtype, device_))
