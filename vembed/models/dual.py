"""Dual encoders: a Hugging Face image + text model (CLIP, SigLIP, SigLIP 2 ...) as one vembed model.

:class:`DualEncoder` is an :class:`~vembed.models.embedder.Embedder` whose image embedding is the
model's own ``get_image_features`` (projection included), L2-normalised — so every image path (``eval``,
``embed``, ``search``, the store) takes it as it is — plus a text tower: ``encode_text(["a red
chair"])`` tokenises with the model's own tokenizer (``AutoTokenizer`` of the same folder or repository)
and returns ``get_text_features``, normalised, in the same space.

Which modules make each tower, the Linear names LoRA adapts and how captions are padded are data of the
family (``Family.dual`` in :mod:`vembed.models.registry`). A folder written by :func:`save_dual_encoder`
is a plain transformers checkpoint (``AutoModel`` + ``AutoTokenizer`` load it) with ``vembed.json``
(``dual_encoder`` marks it). Its image tower also loads as a plain :class:`Embedder` giving the same
image embeddings (every image command, no text needed): CLIP's ``visual_projection`` is kept as the
embedder's projection head, SigLIP's pooling head is part of its vision tower.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vembed import __version__
from vembed.errors import VembedError
from vembed.io import atomic_path, make_readable
from vembed.models.embedder import Embedder
from vembed.models.loader import HEAD_WEIGHTS, LoadedModel, ModelConfig, load_model, write_model_config
from vembed.models.registry import DualTowers, ModelSpec

DUAL_KEY = "dual_encoder"  # the vembed.json key of a saved dual encoder
TOWERS = ("both", "image", "text")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenising in the main process, before forks


def _pooled(out) -> torch.Tensor:
    """transformers >= 5 returns an output object (``pooler_output`` = projected features); older a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class DualEncoder(Embedder):
    """Image and text towers of one model; ``forward`` takes pixels, tokens, or both."""

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        tokenizer,
        *,
        normalize: bool = True,
        max_text_length: int | None = None,
    ):
        towers = spec.family_info.dual
        if towers is None:
            raise VembedError(f"{spec.name}: {spec.family} models have no text tower")
        super().__init__(model, spec, pooling="pooler", normalize=normalize)
        self.tokenizer = tokenizer
        self.towers: DualTowers = towers
        config = _base(model).config
        text_config = getattr(config, "text_config", None)
        self.max_text_length = int(
            max_text_length or getattr(text_config, "max_position_embeddings", 0) or 77
        )

    # -- towers -----------------------------------------------------------------------------------

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's image features (projected), before normalisation."""
        return _pooled(self.backbone.get_image_features(pixel_values=pixel_values))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        options = {} if attention_mask is None else {"attention_mask": attention_mask}
        return _pooled(self.backbone.get_text_features(input_ids=input_ids, **options))

    def text_head(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float(), dim=-1) if self.normalize else features.float()

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        """Image embeddings, text embeddings, or ``(image, text)`` when both are given (training)."""
        text = None if input_ids is None else self.text_head(self.text_features(input_ids, attention_mask))
        if pixel_values is None:
            if text is None:
                raise VembedError("DualEncoder: give pixel_values, input_ids or both")
            return text
        image = self.head(self.features(pixel_values))
        return image if text is None else (image, text)

    # -- text -------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids (and attention mask where the family uses one) of ``texts``, on the CPU."""
        padding = self.towers.text_padding
        out = self.tokenizer(
            list(texts),
            padding=padding,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        ids = out["input_ids"]
        if padding == "max_length":  # the tower pools the last position: no mask (as it was trained)
            return {"input_ids": ids}
        return {"input_ids": ids, "attention_mask": out["attention_mask"]}

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        """Text embeddings ``[N, D]`` float32 on the CPU (normalised like the image embeddings)."""
        chunks = []
        with self.evaluating():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenize(texts[start : start + batch_size])
                tokens = {k: v.to(self.device) for k, v in tokens.items()}
                chunks.append(self(**tokens).float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)

    # -- which parameters belong to which tower ---------------------------------------------------

    def tower_of(self, name: str) -> str | None:
        """``image``, ``text`` or None (shared: logit scale / bias) for a parameter name of the backbone."""
        name = _strip_peft(name)
        if name.startswith(tuple(p + "." for p in self.towers.image_modules)):
            return "image"
        if name.startswith(tuple(p + "." for p in self.towers.text_modules)):
            return "text"
        return None

    def logit_parameters(self) -> dict[str, torch.Tensor]:
        """The model's own ``logit_scale`` (and ``logit_bias``): the loss learns its own copy."""
        base = _base(self.backbone)
        return {n: getattr(base, n) for n in ("logit_scale", "logit_bias") if hasattr(base, n)}


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _strip_peft(name: str) -> str:
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


# -- building, LoRA per tower, freezing ----------------------------------------------------------


def towers_set(towers: str) -> set[str]:
    if towers not in TOWERS:
        raise VembedError(f"train.towers={towers!r}: choose one of {', '.join(TOWERS)}")
    return {"image", "text"} if towers == "both" else {towers}


def apply_method(encoder: DualEncoder, method: str, towers: str, lora=None) -> DualEncoder:
    """Freeze everything, then open up the adapting ``towers`` as ``method`` says.

    ``lora``: adapters on the tower's Linear modules named by ``lora.targets`` (default: the family's);
    ``full``: every weight of the tower; ``frozen``: only the tower's projection head. The model's own
    logit scale / bias stay frozen (the loss owns the temperature).
    """
    adapt = towers_set(towers)
    backbone = encoder.backbone
    backbone.requires_grad_(False)
    if method == "full":
        for name, param in backbone.named_parameters():
            param.requires_grad_(encoder.tower_of(name) in adapt)
    elif method == "frozen":
        heads = {"image": encoder.towers.image_head, "text": encoder.towers.text_head}
        prefixes = tuple(p + "." for tower in adapt for p in heads[tower])
        for name, param in backbone.named_parameters():
            param.requires_grad_(_strip_peft(name).startswith(prefixes))
    elif method == "lora":
        _apply_tower_lora(encoder, adapt, lora)
    else:
        raise VembedError(f"train.method={method!r}: choose lora, full or frozen")
    return encoder


def _apply_tower_lora(encoder: DualEncoder, adapt: set[str], lora) -> None:
    from peft import LoraConfig, get_peft_model

    from vembed.models.lora import lora_target_modules

    explicit = lora is not None and lora.targets is not None
    candidates = list(lora.targets) if explicit else list(encoder.towers.lora_targets)
    names = lora_target_modules(encoder.backbone, candidates, explicit=explicit)
    targets = [n for n in names if encoder.tower_of(n + ".weight") in adapt]
    if not targets:
        raise VembedError(
            f"method=lora: none of {', '.join(candidates)} is a Linear module of the "
            f"{' and '.join(sorted(adapt))} tower(s)"
        )
    config = LoraConfig(
        r=getattr(lora, "r", 16),
        lora_alpha=getattr(lora, "alpha", 32),
        lora_dropout=getattr(lora, "dropout", 0.05),
        target_modules=targets,
        bias="none",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        encoder.backbone = get_peft_model(encoder.backbone, config)


def has_text_tower(loaded: LoadedModel) -> bool:
    """Whether ``loaded`` (a :func:`load_model` result) is a model with both towers."""
    if loaded.spec.family_info.dual is None:
        return False
    if loaded.config is not None and DUAL_KEY in loaded.config.extra:
        return True
    config = _config_json(loaded)
    return isinstance(config, dict) and "text_config" in config


def is_saved_dual_encoder(loaded: LoadedModel) -> bool:
    """A folder :func:`save_dual_encoder` wrote (``vembed.json: dual_encoder``)."""
    return loaded.config is not None and DUAL_KEY in loaded.config.extra


def embeds_for_text(embedder: Embedder, model: str | Path) -> bool:
    """Whether ``embedder``'s image embeddings share a space with a text tower: a :class:`DualEncoder`,
    or the image tower of a dual encoder vembed saved (a local folder or run directory)."""
    if isinstance(embedder, DualEncoder):
        return True
    from vembed.models.loader import read_model_config, resolve_ref

    try:
        ref = resolve_ref(model)
    except VembedError:
        return False
    saved = read_model_config(ref.folder) if ref.folder is not None else None
    return saved is not None and DUAL_KEY in saved.extra


def _config_json(loaded: LoadedModel) -> dict | None:
    from vembed.models.loader import _json, hub_file

    ref = loaded.ref
    if ref.kind == "folder":
        path = Path(ref.name) / "config.json"
    else:
        path = hub_file(loaded.spec.source, "config.json", required=True)
    return _json(path)


def load_dual_encoder(
    model: str | Path | LoadedModel,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attention: str = "auto",
) -> DualEncoder:
    """The dual encoder a reference names (registry name, hub id or folder), with its own tokenizer."""
    import transformers

    from vembed.models.factory import resolve_device, resolve_dtype
    from vembed.models.weights import check_model_folder

    loaded = model if isinstance(model, LoadedModel) else load_model(model, revision=revision, weights=False)
    spec = loaded.spec
    towers = spec.family_info.dual
    if towers is None or not has_text_tower(loaded):
        raise VembedError(
            f"{loaded.ref.text}: a {spec.family} vision model without a text tower; image-text needs a "
            "dual encoder (clip-vit-b32, clip-vit-b16, clip-vit-l14, laion-clip-b32, siglip-base, "
            "siglip2-base, or a CLIP / SigLIP folder with its text tower)"
        )
    source = spec.source
    if Path(source).is_dir():
        check_model_folder(source)
    transformers.utils.logging.disable_progress_bar()
    options = {} if attention == "auto" else {"attn_implementation": attention}
    cls = getattr(transformers, towers.model_class)
    try:
        backbone = cls.from_pretrained(source, revision=revision, **options)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VembedError(f"cannot load the dual encoder {source!r}: {first}") from None
    width = getattr(backbone.config, "projection_dim", None) or backbone.config.vision_config.hidden_size
    saved = loaded.config.extra.get(DUAL_KEY, {}) if loaded.config is not None else {}
    encoder = DualEncoder(
        backbone,
        spec.replace(embed_dim=int(width), pooling="pooler"),
        tokenizer,
        normalize=loaded.config.normalize is not False if loaded.config is not None else True,
        max_text_length=saved.get("max_text_length"),
    )
    device_ = resolve_device(device)
    return encoder.to(device=device_, dtype=resolve_dtype(dtype, device_))


def merged(encoder: DualEncoder) -> DualEncoder:
    """A copy with LoRA merged into plain weights (the encoder itself when it has no adapters)."""
    from vembed.models.lora import merge_lora

    return merge_lora(encoder)


def save_dual_encoder(
    encoder: DualEncoder, out_dir: str | Path, *, dtype: torch.dtype | None = None, extra: dict | None = None
) -> Path:
    """A folder plain transformers loads (``AutoModel``, ``AutoTokenizer``, ``AutoImageProcessor``) and
    vembed loads back as this dual encoder; LoRA merged first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = merged(encoder)
    backbone = encoder.backbone if dtype is None else encoder.backbone.to(dtype)
    backbone.save_pretrained(out_dir, safe_serialization=True)
    encoder.tokenizer.save_pretrained(out_dir)
    image_processor(encoder.spec).save_pretrained(out_dir)
    projection = getattr(_base(backbone), "visual_projection", None)
    if projection is not None:  # the image tower as a plain Embedder: pooler -> this projection
        weight = projection.weight.detach().cpu().contiguous()
        head = {
            "projection.weight": weight,
            "projection.bias": torch.zeros(weight.shape[0], dtype=weight.dtype),
        }
        with atomic_path(out_dir / HEAD_WEIGHTS) as tmp:
            save_file(head, str(tmp))
    make_readable(out_dir)
    spec = encoder.spec
    extra = dict(extra or {})
    extra[DUAL_KEY] = {
        "model_class": encoder.towers.model_class,
        "max_text_length": encoder.max_text_length,
        "text_padding": encoder.towers.text_padding,
    }
    config = ModelConfig(
        vembed_version=__version__,
        base_model=extra.pop("base_model", None) or spec.base_model or spec.source,
        family=spec.family,
        pooling="pooler",
        projection_dim=encoder.embed_dim if projection is not None else None,
        normalize=encoder.normalize,
        embed_dim=encoder.embed_dim,
        lora_targets=list(encoder.towers.lora_targets),
        preprocessing=spec.preprocessing(),
        extra=extra,
    )
    write_model_config(out_dir, config)
    return out_dir


def image_processor(spec: ModelSpec):
    """The transformers image processor doing the model's preprocessing (saved with exports)."""
    import transformers

    common = dict(
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        resample=3 if spec.interpolation == "bicubic" else 2,
        do_resize=True,
        do_normalize=True,
        do_rescale=True,
    )
    size = spec.image_size

    def pick(name: str):  # transformers >= 5 without torchvision: the PIL backend of the same processor
        return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)

    if spec.resize == "square":
        return pick("SiglipImageProcessor")(size={"height": size, "width": size}, **common)
    return pick("CLIPImageProcessor")(
        size={"shortest_edge": spec.resize_size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        **common,
    )
