"""Create, load and save :class:`Embedder` models (registry name, hub id, or local folder)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from vembed import __version__
from vembed.console import log
from vembed.errors import VembedError
from vembed.io import atomic_path, make_readable, read_json, write_json
from vembed.models.embedder import Embedder
from vembed.models.registry import ModelSpec, resolve_spec
from vembed.models.weights import check_model_folder, load_safetensors, refusal
from vembed.settings import ModelSettings

VEMBED_CONFIG = "vembed.json"
HEAD_WEIGHTS = "vembed_head.safetensors"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → cuda if available, then mps, else cpu."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on GPUs that support it (fp16 otherwise), fp32 on CPU."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_backbone(spec: ModelSpec, *, revision: str | None = None) -> torch.nn.Module:
    """Load the vision tower named by ``spec`` through ``from_pretrained`` (hub id or folder)."""
    cls = getattr(transformers, spec.family_info.model_class)
    transformers.utils.logging.disable_progress_bar()
    if Path(spec.source).is_dir():
        check_model_folder(spec.source)
    try:
        return cls.from_pretrained(spec.source, revision=revision)
    except OSError as exc:
        raise VembedError(f"cannot load model weights from {spec.source!r}: {exc}") from None
    except Exception as exc:  # a pickle refused by weights_only, a broken safetensors file
        error = refusal(spec.source, exc)
        if error is None:
            raise
        raise error from None


def create_embedder(model: str | Path | None = None, settings: ModelSettings | None = None) -> Embedder:
    """Build the embedding model for ``model`` (default: ``settings.name``) on its device and dtype.

    A folder written by ``vembed export`` (or a run's ``final/``) brings back its pooling, projection
    and preprocessing; explicit settings override the spec's pooling and image size.
    """
    settings = settings or ModelSettings()
    name = str(model if model is not None else settings.name)
    spec = resolve_spec(name)
    if settings.image_size:
        spec = spec.replace(image_size=settings.image_size)
    saved = read_json(Path(name) / VEMBED_CONFIG)
    pooling = settings.pooling or spec.pooling
    projection_dim = settings.projection_dim
    normalize = settings.normalize
    if saved:
        projection_dim = saved.get("projection_dim") if projection_dim is None else projection_dim
        normalize = saved.get("normalize", normalize)
    embedder = Embedder(
        load_backbone(spec, revision=settings.revision),
        spec,
        pooling=pooling,
        projection_dim=projection_dim,
        normalize=normalize,
    )
    head_file = Path(name) / HEAD_WEIGHTS
    if projection_dim and not head_file.is_file():
        log(
            f"[yellow]note:[/] {name} has no projection head; adding a new, randomly initialised "
            f"{projection_dim}-d projection (it needs training before its embeddings mean anything)"
        )
    if saved and head_file.is_file():
        state = load_safetensors(head_file)
        missing, unexpected = embedder.load_state_dict(state, strict=False)
        if unexpected:
            raise VembedError(f"{head_file}: unexpected weights {unexpected}")
    device = resolve_device(settings.device)
    return embedder.to(device=device, dtype=resolve_dtype(settings.dtype, device))


def save_embedder(
    embedder: Embedder, out_dir: str | Path, *, dtype: torch.dtype | None = None, extra: dict | None = None
) -> Path:
    """Write a self-contained model folder that ``create_embedder`` and plain transformers load.

    ``config.json`` + ``model.safetensors`` are the backbone (``AutoModel.from_pretrained(out_dir)``
    works); ``vembed.json`` records pooling, projection, normalisation and preprocessing;
    ``vembed_head.safetensors`` holds the projection / GeM weights when there are any.
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
    if head:
        with atomic_path(out_dir / HEAD_WEIGHTS) as tmp:
            save_file(head, str(tmp))
    spec = embedder.spec
    write_json(
        out_dir / VEMBED_CONFIG,
        {
            "vembed_version": __version__,
            "base_model": spec.name if spec.source == spec.name and "/" not in spec.name else spec.source,
            "family": spec.family,
            "pooling": embedder.pooling,
            "projection_dim": embedder.projection.out_features if embedder.projection is not None else None,
            "normalize": embedder.normalize,
            "embed_dim": embedder.embed_dim,
            "num_prefix_tokens": embedder.num_prefix_tokens,
            "lora_targets": list(spec.lora_targets),
            "preprocessing": spec.preprocessing(),
            **(extra or {}),
        },
    )
    return out_dir
