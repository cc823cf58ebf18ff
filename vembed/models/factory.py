"""Create, load and save :class:`Embedder` models (local folder, registry name or hub id: see ``loader``)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from vembed import __version__
from vembed.console import log
from vembed.errors import VembedError
from vembed.io import atomic_path, make_readable
from vembed.models.embedder import Embedder
from vembed.models.loader import (
    HEAD_WEIGHTS,
    TASK_HEAD_PREFIX,
    VEMBED_CONFIG,
    LoadedModel,
    ModelConfig,
    load_model,
    write_model_config,
)
from vembed.models.precision import resolve_dtype
from vembed.models.registry import ModelSpec
from vembed.models.weights import check_model_folder, refusal
from vembed.settings import ModelSettings

__all__ = [
    "HEAD_WEIGHTS",
    "VEMBED_CONFIG",
    "build_embedder",
    "create_embedder",
    "load_backbone",
    "load_embedder",
    "resolve_device",
    "resolve_dtype",
    "save_embedder",
]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → cuda if available, then mps, else cpu."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_backbone(
    spec: ModelSpec, *, revision: str | None = None, attention: str = "auto"
) -> torch.nn.Module:
    """Load the vision tower named by ``spec`` through ``from_pretrained`` (hub id or folder).

    ``attention`` is transformers' ``attn_implementation`` (``auto``: transformers' default).
    """
    cls = getattr(transformers, spec.family_info.model_class)
    transformers.utils.logging.disable_progress_bar()
    if Path(spec.source).is_dir():
        check_model_folder(spec.source)
    options = {} if attention == "auto" else {"attn_implementation": attention}
    try:
        return cls.from_pretrained(
            spec.source, revision=revision, **dict(spec.family_info.load_options), **options
        )
    except (ImportError, ValueError) as exc:
        if not options:
            raise
        raise VembedError(f"model.attention={attention}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise VembedError(f"cannot load model weights from {spec.source!r}: {exc}") from None
    except Exception as exc:  # a pickle refused by weights_only, a broken safetensors file
        error = refusal(spec.source, exc)
        if error is None:
            raise
        raise error from None


def load_embedder(
    model: str | Path,
    *,
    pooling: str | None = None,
    projection_dim: int | None = None,
    normalize: bool | None = None,
    image_size: int | None = None,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attention: str = "auto",
    truncate_dim: int | None = None,
) -> Embedder:
    """The embedding model for ``model`` (local folder > registry name > hub id) on its device and dtype.

    A folder saved by vembed (``vembed export``, a run's ``final/``) brings back its pooling,
    projection, normalisation and preprocessing; arguments given here override them. ``dtype`` and
    ``attention`` are ``model.dtype`` and ``model.attention`` (see :mod:`vembed.models.precision`).
    """
    return build_embedder(
        load_model(model, revision=revision, attention=attention),
        pooling=pooling,
        projection_dim=projection_dim,
        normalize=normalize,
        image_size=image_size,
        device=device,
        dtype=dtype,
        truncate_dim=truncate_dim,
    )


def build_embedder(
    loaded: LoadedModel,
    *,
    pooling: str | None = None,
    projection_dim: int | None = None,
    normalize: bool | None = None,
    image_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    truncate_dim: int | None = None,
) -> Embedder:
    """An :class:`Embedder` from a :func:`load_model` result, its saved head weights loaded.

    ``truncate_dim`` keeps the first N embedding dims, re-normalised (default: what the folder saved).
    """
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
    device_ = resolve_device(device)
    return embedder.to(device=device_, dtype=resolve_dtype(dtype, device_))


def create_embedder(model: str | Path | None = None, settings: ModelSettings | None = None) -> Embedder:
    """:func:`load_embedder` with its arguments taken from ``model.*`` settings (the CLI / recipe boundary)."""
    settings = settings or ModelSettings()
    return load_embedder(
        str(model if model is not None else settings.name),
        pooling=settings.pooling,
        projection_dim=settings.projection_dim,
        normalize=settings.normalize,
        image_size=settings.image_size,
        revision=settings.revision,
        device=settings.device,
        dtype=settings.dtype,
        attention=settings.attention,
        truncate_dim=settings.truncate_dim,
    )


def save_embedder(
    embedder: Embedder,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    extra: dict | None = None,
    task_head: tuple[dict, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a self-contained model folder that :func:`load_model` and plain transformers load.

    ``config.json`` + ``model.safetensors`` are the backbone (``AutoModel.from_pretrained(out_dir)``
    works); ``vembed.json`` records pooling, projection, normalisation and preprocessing (plus
    ``extra`` keys); ``vembed_head.safetensors`` holds the projection / GeM weights when there are any.
    ``task_head=(config, state_dict)`` saves a task head beside them (``vembed.json: task_head``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = embedder.backbone
    if dtype is not None:
        backbone = backbone.to(dtype)
    backbone.save_pretrained(out_dir, safe_serialization=True)
    make_readable(out_dir)
    head = {
        k: v.detach().cpu().contiguous()
        for k, v in embedder.state_dict().items()
        if not k.startswith("backbone.")
    }
    if task_head is not None:
        head.update({TASK_HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in task_head[1].items()})
    if head:
        with atomic_path(out_dir / HEAD_WEIGHTS) as tmp:
            save_file(head, str(tmp))
    spec = embedder.spec
    extra = dict(extra or {})
    config = ModelConfig(
        vembed_version=__version__,
        base_model=extra.pop("base_model", None) or spec.base_model or spec.source,
        family=spec.family,
        pooling=embedder.pooling,
        projection_dim=embedder.projection.out_features if embedder.projection is not None else None,
        normalize=embedder.normalize,
        embed_dim=embedder.embed_dim,
        truncate_dim=embedder.truncate_dim,
        num_prefix_tokens=embedder.num_prefix_tokens,
        lora_targets=list(spec.lora_targets),
        preprocessing=spec.preprocessing(),
        task_head=dict(task_head[0]) if task_head is not None else None,
        extra=extra,
    )
    write_model_config(out_dir, config)
    return out_dir
