"""The model registry: short names → :class:`ModelSpec`, so preprocessing travels with the model.

A spec holds where the weights come from and everything needed to feed and pool the backbone.
Any hub id or local directory also resolves to a spec, read from its ``config.json`` and
``preprocessor_config.json`` (and the ``vembed.json`` vembed writes) by :mod:`vembed.models.loader`.
This module is data: it imports nothing else of vembed's but its errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vembed.errors import VembedError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
# LoRA's candidate Linear names in the attention blocks (old and new transformers spellings)
VIT_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")
CLIP_LORA = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class Family:
    """What vembed knows about a backbone family (transformers model types, tokens, LoRA targets)."""

    name: str
    model_types: tuple[str, ...]
    model_class: str  # transformers class that loads the vision tower
    has_cls: bool
    default_pooling: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    lora_targets: tuple[str, ...]  # candidate Linear names (old and new transformers spellings)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    resize: str = "shorter"  # shorter side + centre crop, or "square": both sides, no crop
    # the image + text model of the family, when it has one (``vembed.models.dual``); empty: vision only
    dual: DualTowers | None = None
    load_options: tuple[tuple[str, object], ...] = ()  # extra from_pretrained keywords
    interpolate_position: bool = False  # pass interpolate_pos_encoding=True (other input sizes)
    has_pooler: bool = True  # the backbone returns a pooler_output (``model.pooling: pooler``)

    @property
    def forward_options(self) -> dict:
        """Keywords every forward of the backbone takes (``interpolate_pos_encoding``)."""
        return {"interpolate_pos_encoding": True} if self.interpolate_position else {}


@dataclass(frozen=True)
class DualTowers:
    """What a dual-encoder family (CLIP, SigLIP) adds to its vision tower: the text tower.

    ``image_modules`` / ``text_modules`` are the module-name prefixes of each tower inside the dual
    model (projections included), so LoRA, freezing and ``train.towers`` apply per tower;
    ``lora_targets`` are the Linear names adapted in both towers. ``text_padding``: ``max_length``
    where the text tower pools the last position (SigLIP was trained with 64-token padded captions),
    ``longest`` where it finds the end-of-text token (CLIP).
    """

    model_class: str  # transformers class of the image + text model
    image_modules: tuple[str, ...]
    text_modules: tuple[str, ...]
    lora_targets: tuple[str, ...]
    image_head: tuple[str, ...]  # the projection of each tower (what method=frozen trains)
    text_head: tuple[str, ...]
    text_padding: str = "longest"
    default_loss: str = "clip"


CLIP_TOWERS = DualTowers(
    "CLIPModel",
    ("vision_model", "visual_projection"),
    ("text_model", "text_projection"),
    CLIP_LORA,
    ("visual_projection",),
    ("text_projection",),
)
SIGLIP_TOWERS = DualTowers(
    "SiglipModel",
    ("vision_model",),
    ("text_model",),
    CLIP_LORA,
    ("vision_model.head",),
    ("text_model.head",),
    text_padding="max_length",
    default_loss="siglip",
)


DINOV2 = Family("dinov2", ("dinov2",), "Dinov2Model", True, "cls", IMAGENET_MEAN, IMAGENET_STD, VIT_LORA)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        DINOV2,
        dataclasses.replace(
            DINOV2,
            name="dinov2_with_registers",
            model_types=("dinov2_with_registers",),
            model_class="Dinov2WithRegistersModel",
        ),
        Family(
            "dinov3",
            ("dinov3_vit",),
            "DINOv3ViTModel",
            True,
            "cls",
            IMAGENET_MEAN,
            IMAGENET_STD,
            ("q_proj", "k_proj", "v_proj", "o_proj"),
            crop_pct=1.0,
            interpolation="bilinear",
            resize="square",  # DINOv3ViTImageProcessor: 224 x 224 bilinear, no crop
        ),
        Family(
            "clip",
            ("clip", "clip_vision_model"),
            "CLIPVisionModel",
            True,
            "pooler",
            CLIP_MEAN,
            CLIP_STD,
            CLIP_LORA,
            crop_pct=1.0,
            dual=CLIP_TOWERS,
        ),
        Family(
            "siglip",
            ("siglip", "siglip_vision_model"),
            "SiglipVisionModel",
            False,
            "pooler",
            HALF,
            HALF,
            CLIP_LORA,
            crop_pct=1.0,
            resize="square",  # SiglipImageProcessor: 224 x 224 bicubic, no crop
            dual=SIGLIP_TOWERS,
        ),
        # transformers' ViTModel: DINO v1, DeiT (the non-distilled checkpoints) and the original ViT.
        # Defaults are DINO's / DeiT's evaluation (resize 256 bicubic, crop 224, ImageNet mean/std); a
        # repository's preprocessor_config.json (google/vit-*: 224 x 224 bilinear, mean/std 0.5) wins.
        # No pooler (DINO has none; google's is an ImageNet-21k classifier layer); CLS pooling.
        Family(
            "vit",
            ("vit",),
            "ViTModel",
            True,
            "cls",
            IMAGENET_MEAN,
            IMAGENET_STD,
            VIT_LORA,
            load_options=(("add_pooling_layer", False),),
            interpolate_position=True,  # ViT refuses another input size without it
            has_pooler=False,
        ),
    ]
}


@dataclass(frozen=True)
class ModelSpec:
    """A backbone and its preprocessing: the single source of truth for every subcommand."""

    name: str
    source: str  # hub id or local directory passed to from_pretrained
    family: str
    image_size: int
    patch_size: int
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str
    lora_targets: tuple[str, ...]
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    num_register_tokens: int = 0
    description: str = ""
    resize: str = "shorter"  # "shorter": shorter side to resize_size, centre crop; "square": no crop
    base_model: str = ""  # what the weights were first loaded from (hub id or folder), kept through saves

    @property
    def family_info(self) -> Family:
        return FAMILIES[self.family]

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop (timm's crop_pct convention); ``image_size`` for square."""
        return self.image_size if self.resize == "square" else round(self.image_size / self.crop_pct)

    def preprocessing(self) -> dict:
        """The eval preprocessing as recorded in ``vembed.json`` and store metadata."""
        return {
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "crop_pct": self.crop_pct,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize": self.resize,
        }

    def replace(self, **changes) -> ModelSpec:
        return dataclasses.replace(self, **changes)


def _spec(name, source, family, image_size, patch_size, embed_dim, description, **kw) -> ModelSpec:
    fam = FAMILIES[family]
    return ModelSpec(
        name=name,
        source=source,
        family=family,
        image_size=image_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        mean=kw.pop("mean", fam.mean),
        std=kw.pop("std", fam.std),
        pooling=kw.pop("pooling", fam.default_pooling),
        lora_targets=kw.pop("lora_targets", fam.lora_targets),
        crop_pct=kw.pop("crop_pct", fam.crop_pct),
        interpolation=kw.pop("interpolation", fam.interpolation),
        resize=kw.pop("resize", fam.resize),
        description=description,
        **kw,
    )


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a spec to the registry (also usable by plugins and tests)."""
    REGISTRY[spec.name] = spec
    return spec


for _size, _dim in [("small", 384), ("base", 768), ("large", 1024), ("giant", 1536)]:
    register(
        _spec(
            f"dinov2-{_size}",
            f"facebook/dinov2-{_size}",
            "dinov2",
            224,
            14,
            _dim,
            f"DINOv2 ViT-{_size[0].upper()}/14",
        )
    )
    register(
        _spec(
            f"dinov2-{_size}-reg",
            f"facebook/dinov2-with-registers-{_size}",
            "dinov2_with_registers",
            224,
            14,
            _dim,
            f"DINOv2 ViT-{_size[0].upper()}/14 with 4 registers",
            num_register_tokens=4,
        )
    )
for _size, _dim in [("small", 384), ("base", 768), ("large", 1024)]:
    _abbr = {"small": "vits16", "base": "vitb16", "large": "vitl16"}[_size]
    register(
        _spec(
            f"dinov3-{_size}",
            f"facebook/dinov3-{_abbr}-pretrain-lvd1689m",
            "dinov3",
            224,
            16,
            _dim,
            f"DINOv3 ViT-{_size[0].upper()}/16 (gated on the hub)",
            num_register_tokens=4,
        )
    )
register(
    _spec("clip-vit-b32", "openai/clip-vit-base-patch32", "clip", 224, 32, 768, "CLIP ViT-B/32 vision tower")
)
register(
    _spec("clip-vit-b16", "openai/clip-vit-base-patch16", "clip", 224, 16, 768, "CLIP ViT-B/16 vision tower")
)
register(
    _spec(
        "clip-vit-l14", "openai/clip-vit-large-patch14", "clip", 224, 14, 1024, "CLIP ViT-L/14 vision tower"
    )
)
register(
    _spec(
        "laion-clip-b32",
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        "clip",
        224,
        32,
        768,
        "LAION-2B CLIP ViT-B/32 vision tower (open_clip weights in transformers format)",
    )
)
register(
    _spec("siglip-base", "google/siglip-base-patch16-224", "siglip", 224, 16, 768, "SigLIP B/16 vision tower")
)
register(
    _spec(
        "siglip-so400m",
        "google/siglip-so400m-patch14-384",
        "siglip",
        384,
        14,
        1152,
        "SigLIP So400m/14 @384 vision tower",
    )
)


register(
    _spec(
        "siglip2-base",
        "google/siglip2-base-patch16-224",
        "siglip",
        224,
        16,
        768,
        "SigLIP 2 B/16 @224 vision tower (fixed resolution; loads as SigLIP)",
    )
)

# DINO v1 (Caron et al. 2021): self-supervised ViTs; ViT-S/16 is open-metric-learning's SOP backbone.
for _name, _dim, _patch, _what in [
    ("vits16", 384, 16, "ViT-S/16"),
    ("vits8", 384, 8, "ViT-S/8"),
    ("vitb16", 768, 16, "ViT-B/16"),
    ("vitb8", 768, 8, "ViT-B/8"),
]:
    register(_spec(f"dino-{_name}", f"facebook/dino-{_name}", "vit", 224, _patch, _dim, f"DINO v1 {_what}"))
for _size, _dim in [("tiny", 192), ("small", 384), ("base", 768)]:
    register(
        _spec(
            f"deit-{_size}",
            f"facebook/deit-{_size}-patch16-224",
            "vit",
            224,
            16,
            _dim,
            f"DeiT-{_size[0].upper()}/16 (ImageNet-1k supervised)",
        )
    )
for _name, _source, _dim, _what in [
    ("vit-base", "google/vit-base-patch16-224", 768, "ViT-B/16 (ImageNet-21k, fine-tuned on 1k)"),
    ("vit-base-in21k", "google/vit-base-patch16-224-in21k", 768, "ViT-B/16 (ImageNet-21k)"),
    ("vit-large", "google/vit-large-patch16-224", 1024, "ViT-L/16 (ImageNet-21k, fine-tuned on 1k)"),
]:
    register(
        _spec(
            _name,
            _source,
            "vit",
            224,
            16,
            _dim,
            _what,
            mean=HALF,
            std=HALF,
            crop_pct=1.0,
            interpolation="bilinear",
            resize="square",  # ViTImageProcessor: 224 x 224 bilinear, no crop
        )
    )


def list_models() -> list[ModelSpec]:
    """Every registered spec, in registration order."""
    return list(REGISTRY.values())


def family_for_model_type(model_type: str, *, where: str = "") -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise VembedError(
        f"{where or 'model'}: unsupported model_type {model_type!r}; vembed supports {', '.join(known)}"
    )


def registry_name(source: str) -> str | None:
    """The registry name whose weights come from ``source`` (``facebook/dinov2-base`` → ``dinov2-base``)."""
    for spec in REGISTRY.values():
        if spec.source == source:
            return spec.name
    return None


def spec_from_config(config: dict, *, name: str, source: str, preprocessor: dict | None = None) -> ModelSpec:
    """Derive a spec from a transformers config dict (the vision part of CLIP/SigLIP configs)."""
    model_type = config.get("model_type", "")
    if model_type in ("clip", "siglip") and "vision_config" in config:
        vision = dict(config["vision_config"])
    else:
        vision = config
    fam = family_for_model_type(model_type, where=name)
    config_size = int(vision.get("image_size", 224))
    # DINOv2 configs say 518 (the pretraining size); 224 is the usual evaluation size.
    image_size = min(config_size, 224) if fam.name.startswith("dinov") else config_size
    pre = {"image_size": image_size, "crop_pct": fam.crop_pct, "resize": fam.resize}
    pre.update(interpolation=fam.interpolation, mean=fam.mean, std=fam.std)
    if preprocessor:
        pre.update(preprocessing_from_processor(preprocessor))
    return ModelSpec(
        name=name,
        source=source,
        family=fam.name,
        image_size=pre["image_size"],
        patch_size=int(vision.get("patch_size", 14)),
        embed_dim=int(vision.get("hidden_size", 768)),
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        pooling=fam.default_pooling,
        lora_targets=fam.lora_targets,
        crop_pct=pre["crop_pct"],
        interpolation=pre["interpolation"],
        resize=pre["resize"],
        num_register_tokens=int(vision.get("num_register_tokens", 0) or 0),
    )


_RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}  # PIL codes in preprocessor_config.json


def preprocessing_from_processor(processor: dict) -> dict:
    """What a transformers ``preprocessor_config.json`` says, in :class:`ModelSpec` fields.

    ``size: {shortest_edge: S}`` + ``crop_size: C`` is resize-shorter-then-crop (crop_pct C / S);
    ``size: {height, width}`` without a centre crop is a square resize (SigLIP, DINOv3).
    """
    out: dict = {}
    size, crop = processor.get("size"), processor.get("crop_size")
    crop = crop.get("height") if isinstance(crop, dict) else crop
    do_crop = bool(processor.get("do_center_crop", crop is not None)) and isinstance(crop, int)
    if isinstance(size, dict) and "shortest_edge" in size:
        shortest = int(size["shortest_edge"])
        out.update(resize="shorter", image_size=crop if do_crop else shortest)
        out["crop_pct"] = crop / shortest if do_crop else 1.0
    elif isinstance(size, dict) and "height" in size:
        out.update(resize="square", image_size=crop if do_crop else int(size["height"]), crop_pct=1.0)
    elif isinstance(size, int) and not isinstance(size, bool) and size > 0:  # older processors: one number
        if do_crop:
            out.update(resize="shorter", image_size=crop, crop_pct=crop / size)
        else:  # ViTFeatureExtractor: both sides to `size`
            out.update(resize="square", image_size=size, crop_pct=1.0)
    elif isinstance(crop, int):
        out["image_size"] = crop
    if processor.get("resample") in _RESAMPLE_NAMES:
        out["interpolation"] = _RESAMPLE_NAMES[processor["resample"]]
    if processor.get("image_mean") is not None:
        out["mean"] = tuple(processor["image_mean"])
    if processor.get("image_std") is not None:
        out["std"] = tuple(processor["image_std"])
    return out
