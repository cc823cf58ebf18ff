"""Create, load and save :class:`Embedder` models (local folder, registry name or hub id: see ``loader``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vembed import __version__
from vembed.console import log
from vembed.errors import VembedError
from vembed.io import atomic_path, make_readable
from vembed.models.embedder import Embedder
from vembed.models.heads import Head
from vembed.models.loader import (
    HEAD_WEIGHTS,
    TASK_HEAD_PREFIX,
    VEMBED_CONFIG,
    LoadedModel,
    ModelConfig,
    load_backbone,
    load_model,
    write_model_config,
)
from vembed.models.precision import resolve_device, resolve_dtype

__all__ = [
    "HEAD_WEIGHTS",
    "VEMBED_CONFIG",
    "ModelOptions",
    "build_embedder",
    "create_embedder",
    "load_backbone",
    "load_embedder",
    "resolve_device",
    "resolve_dtype",
    "save_model",
]


def load_embedder(model: str | Path, **options) -> Embedder:
    """The embedding model for ``model`` (local folder > registry name > hub id) on its device and dtype.

    ``options`` are fields of :class:`ModelOptions` (``pooling``, ``projection_dim``, ``normalize``,
    ``image_size``, ``revision``, ``device``, ``dtype``, ``attention``, ``truncate_dim``). A folder saved
    by vembed (``vembed export``, a run's ``final/``) brings back its pooling, projection, normalisation
    and preprocessing; options given here override them. ``dtype`` and ``attention`` are ``model.dtype``
    and ``model.attention`` (see :mod:`vembed.models.precision`).
    """
    return create_embedder(model, ModelOptions(**options))


def build_embedder(loaded: LoadedModel, options: ModelOptions | None = None) -> Embedder:
    """An :class:`Embedder` from a :func:`load_model` result, its saved head weights loaded, on
    ``options.device`` in ``options.dtype``.

    ``options.truncate_dim`` keeps the first N embedding dims, re-normalised (default: what the folder
    saved); ``pooling``, ``projection_dim``, ``normalize`` and ``image_size`` likewise override the folder's.
    """
    options = options or ModelOptions()
    pooling, projection_dim, normalize = options.pooling, options.projection_dim, options.normalize
    image_size, truncate_dim = options.image_size, options.truncate_dim
    spec = loaded.spec
    if image_size:
        spec = spec.replace(image_size=image_size)
    saved = loaded.config
    if saved is not None:
        projection_dim = saved.projection_dim if projection_dim is None else projection_dim
        normalize = saved.normalize if normalize is None else normalize
        truncate_dim = saved.truncate_dim if truncate_dim is None else truncate_dim
    embedder = Embedder(
        loaded.backbone,
        spec,
        pooling=pooling or spec.pooling,
        projection_dim=projection_dim,
        normalize=True if normalize is None else normalize,
        truncate_dim=truncate_dim,
    )
    if projection_dim and "projection.weight" not in loaded.head_state:
        log(
            f"[yellow]note:[/] {loaded.ref.name} has no projection head; adding a new, randomly initialised "
            f"{projection_dim}-d projection (it needs training before its embeddings mean anything)"
        )
    if loaded.head_state:
        _missing, unexpected = embedder.load_state_dict(loaded.head_state, strict=False)
        if unexpected:
            raise VembedError(f"{loaded.ref.name}/{HEAD_WEIGHTS}: unexpected weights {unexpected}")
    device_ = resolve_device(options.device)
    return embedder.to(device=device_, dtype=resolve_dtype(options.dtype, device_))


@dataclass(frozen=True)
class ModelOptions:
    """How a model reference becomes a model: the fields of ``model.*`` settings that loading needs.

    ``vembed.settings.ModelSettings`` has these attributes, so it can be passed wherever a
    ``ModelOptions`` is taken (``models/`` does not import the settings). ``None``: the model's own
    (its ``vembed.json``, else the registry / config default).
    """

    name: str = "dinov2-small"
    pooling: str | None = None
    projection_dim: int | None = None
    normalize: bool | None = None
    truncate_dim: int | None = None
    image_size: int | None = None
    decoder: str = "linear"
    dtype: str = "auto"
    device: str = "auto"
    attention: str = "auto"
    revision: str | None = None


def create_embedder(
    model: str | Path | LoadedModel | None = None, options: ModelOptions | None = None
) -> Embedder:
    """:func:`load_embedder` with its arguments taken from ``options`` (``model.*`` settings).

    ``model`` may be a :func:`load_model` result read without weights (``weights=False``, e.g. to check
    its head first): its files are not read again, only the backbone's weights are loaded.
    """
    options = options or ModelOptions()
    weights = dict(revision=options.revision, attention=options.attention)
    if isinstance(model, LoadedModel):
        loaded = model
        if loaded.backbone is None:
            loaded.backbone = load_backbone(loaded.spec, **weights)
    else:
        loaded = load_model(str(model if model is not None else options.name), **weights)
    return build_embedder(loaded, options)


def save_model(
    model: nn.Module,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    extra: dict | None = None,
    head: Head | None = None,
) -> Path:
    """The one model writer: a self-contained folder that :func:`load_model` and plain transformers load.

    ``model`` is an :class:`Embedder` or a :class:`~vembed.models.segmenter.Segmenter` (anything with
    ``backbone``, ``spec``, ``identity()`` and ``own_weights()``). ``config.json`` + ``model.safetensors``
    are the backbone (``AutoModel.from_pretrained(out_dir)`` works); ``vembed.json`` records pooling,
    projection, normalisation and preprocessing (plus ``extra`` keys) and the ``head``'s config;
    ``vembed_head.safetensors`` holds the model's own weights (projection, GeM) and the head's
    (``task_head.*``). Merge LoRA first (:func:`vembed.models.lora.merge_lora`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    if dtype is not None:
        backbone = backbone.to(dtype)
    backbone.save_pretrained(out_dir, safe_serialization=True)
    make_readable(out_dir)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.own_weights().items()}
    if head is not None:
        weights.update(
            {TASK_HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in head.weights().items()}
        )
    if weights:
        with atomic_path(out_dir / HEAD_WEIGHTS) as tmp:
            save_file(weights, str(tmp))
    spec = model.spec
    extra = dict(extra or {})
    config = ModelConfig(
        vembed_version=__version__,
        base_model=extra.pop("base_model", None) or spec.base_model or spec.source,
        family=spec.family,
        lora_targets=list(spec.lora_targets),
        preprocessing=spec.preprocessing(),
        task_head=head.config() if head is not None else None,
        extra=extra,
        **model.identity(),
    )
    write_model_config(out_dir, config)
    return out_dir
