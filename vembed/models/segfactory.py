"""Create, load and save :class:`Segmenter` models.

A saved segmentation model is a vembed model folder (see :mod:`vembed.models.loader`): the encoder in
the transformers layout (``config.json`` + ``model.safetensors``, LoRA merged, so
``AutoModel.from_pretrained`` loads it), the decoder weights in ``vembed_head.safetensors`` under
the ``task_head.`` prefix, and ``vembed.json`` whose ``task_head`` says
``{"kind": "segmenter", "decoder": ..., "num_classes": ..., "class_names": [...], "layers": [...]}``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from vembed import __version__
from vembed.console import log
from vembed.data.segmentation import fit_to_patch
from vembed.errors import VembedError
from vembed.io import atomic_path, make_readable
from vembed.models.factory import resolve_device, resolve_dtype
from vembed.models.loader import (
    HEAD_WEIGHTS,
    TASK_HEAD_PREFIX,
    LoadedModel,
    ModelConfig,
    load_model,
    read_model_config,
    resolve_ref,
    write_model_config,
)
from vembed.models.registry import ModelSpec
from vembed.models.segmenter import Segmenter
from vembed.settings import ModelSettings

KIND = "segmenter"


def segmentation_head(model: str | Path) -> dict | None:
    """The ``task_head`` of a saved segmentation model (a folder or run directory), else None."""
    try:
        ref = resolve_ref(model)
    except VembedError:
        return None
    config = read_model_config(ref.folder) if ref.folder is not None else None
    head = config.task_head if config is not None else None
    return head if head and head.get("kind") == KIND else None


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
    model: str | Path | None = None,
    settings: ModelSettings | None = None,
    *,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    decoder: str | None = None,
) -> Segmenter:
    """A segmenter for ``model`` (default ``settings.name``) on ``settings.device`` / ``settings.dtype``.

    A saved segmentation model brings back its decoder, classes and input size; a class count given
    here that differs from the saved one is an error. Any other model gets a new decoder (``decoder``,
    default ``settings.decoder``) for ``num_classes`` classes.
    """
    settings = settings or ModelSettings()
    name = str(model if model is not None else settings.name)
    return build_segmenter(
        load_model(name, revision=settings.revision, attention=settings.attention),
        num_classes=num_classes,
        class_names=class_names,
        decoder=decoder or settings.decoder,
        image_size=settings.image_size,
        device=settings.device,
        dtype=settings.dtype,
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
    head = loaded.task_head if loaded.task_head and loaded.task_head.get("kind") == KIND else None
    if head:
        saved_names = [str(n) for n in head["class_names"]]
        if num_classes is not None and num_classes != len(saved_names):
            raise VembedError(
                f"{name}: the model has {len(saved_names)} classes but the data has {num_classes} "
                "(the class count differs between the run and the data)"
            )
        decoder, class_names, num_classes = head["decoder"], saved_names, len(saved_names)
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
            segmenter.decoder.load_state_dict(loaded.task_head_state)
        except RuntimeError as exc:
            raise VembedError(f"{name}/{HEAD_WEIGHTS}: does not match a {decoder} decoder ({exc})") from None
    device_ = resolve_device(device)
    return segmenter.to(device=device_, dtype=resolve_dtype(dtype, device_))


def save_segmenter(
    segmenter: Segmenter, out_dir: str | Path, *, dtype: torch.dtype | None = None, extra: dict | None = None
) -> Path:
    """Write the encoder (transformers layout), the decoder and ``vembed.json`` into ``out_dir``.

    Merge LoRA first (:func:`vembed.models.lora.merge_lora`): the encoder is saved as it is.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = segmenter.backbone if dtype is None else segmenter.backbone.to(dtype)
    backbone.save_pretrained(out_dir, safe_serialization=True)
    make_readable(out_dir)
    state = {
        TASK_HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in segmenter.decoder.state_dict().items()
    }
    with atomic_path(out_dir / HEAD_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    spec = segmenter.spec
    extra = dict(extra or {})
    config = ModelConfig(
        vembed_version=__version__,
        base_model=extra.pop("base_model", None) or spec.base_model or spec.source,
        family=spec.family,
        pooling=spec.pooling,
        normalize=True,
        embed_dim=spec.embed_dim,
        num_prefix_tokens=segmenter.num_prefix_tokens,
        lora_targets=list(spec.lora_targets),
        preprocessing=spec.preprocessing(),
        task_head={
            "kind": KIND,
            "decoder": segmenter.decoder_name,
            "num_classes": segmenter.num_classes,
            "class_names": segmenter.class_names,
            "layers": segmenter.layers,
        },
        extra=extra,
    )
    write_model_config(out_dir, config)
    return out_dir
