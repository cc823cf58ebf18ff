"""Create, load and save :class:`Segmenter` models.

A saved segmentation model is a plain transformers folder for the encoder (``config.json`` +
``model.safetensors``, LoRA merged: ``AutoModel.from_pretrained`` loads it) plus
``vembed_decoder.safetensors`` (the decoder) and ``vembed.json`` with ``"task": "segmentation"``,
the decoder kind, the class names and the preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vembed import __version__
from vembed.console import log
from vembed.data.segmentation import fit_to_patch
from vembed.errors import VembedError
from vembed.io import atomic_path, make_readable, read_json, write_json
from vembed.models.factory import VEMBED_CONFIG, load_backbone, resolve_device, resolve_dtype
from vembed.models.registry import ModelSpec, resolve_spec
from vembed.models.segmenter import Segmenter
from vembed.settings import ModelSettings

DECODER_WEIGHTS = "vembed_decoder.safetensors"
TASK = "segmentation"


def saved_segmentation(model: str | Path) -> dict | None:
    """The ``vembed.json`` of a saved segmentation model, or None for anything else."""
    saved = read_json(Path(str(model)) / VEMBED_CONFIG)
    return saved if isinstance(saved, dict) and saved.get("task") == TASK else None


def segmentation_spec(model: str | Path, image_size: int | None = None) -> ModelSpec:
    """The registry spec with the input size set (rounded to a multiple of the patch size, with a note)."""
    spec = resolve_spec(model)
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
    """A segmenter for ``model`` (default ``settings.name``) on its device and dtype.

    A saved segmentation model brings back its decoder and classes; a class count given here that
    differs from the saved one is an error. Any other model gets a new decoder (``decoder``,
    default ``settings.decoder`` or ``linear``) for ``num_classes`` classes.
    """
    settings = settings or ModelSettings()
    name = str(model if model is not None else settings.name)
    saved = saved_segmentation(name)
    spec = segmentation_spec(name, settings.image_size)
    if saved:
        saved_names = list(saved["class_names"])
        if num_classes is not None and num_classes != len(saved_names):
            raise VembedError(
                f"{name}: the model has {len(saved_names)} classes but the data has {num_classes} "
                "(the class count differs between the run and the data)"
            )
        chosen = decoder or getattr(settings, "decoder", None)
        if chosen and chosen != saved["decoder"]:
            raise VembedError(f"{name}: the model's decoder is {saved['decoder']!r}, not {chosen!r}")
        decoder, class_names, num_classes = saved["decoder"], saved_names, len(saved_names)
    elif num_classes is None:
        raise VembedError(
            f"{name} is not a segmentation model (no vembed.json with task segmentation); "
            "train one with train.task=segmentation or give the number of classes"
        )
    segmenter = Segmenter(
        load_backbone(spec, revision=settings.revision),
        spec,
        num_classes=num_classes,
        decoder=decoder or getattr(settings, "decoder", None) or "linear",
        class_names=class_names,
    )
    if saved:
        weights = Path(name) / DECODER_WEIGHTS
        if not weights.is_file():
            raise VembedError(f"{name}: {DECODER_WEIGHTS} is missing")
        state = load_file(str(weights))
        try:
            segmenter.decoder.load_state_dict(state)
        except RuntimeError as exc:
            raise VembedError(f"{weights}: does not match a {saved['decoder']} decoder ({exc})") from None
    device = resolve_device(settings.device)
    return segmenter.to(device=device, dtype=resolve_dtype(settings.dtype, device))


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
    state = {k: v.detach().cpu().contiguous() for k, v in segmenter.decoder.state_dict().items()}
    with atomic_path(out_dir / DECODER_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    spec = segmenter.spec
    write_json(
        out_dir / VEMBED_CONFIG,
        {
            "vembed_version": __version__,
            "task": TASK,
            "base_model": spec.name if spec.source == spec.name and "/" not in spec.name else spec.source,
            "family": spec.family,
            "decoder": segmenter.decoder_name,
            "decoder_layers": segmenter.layers,
            "num_classes": segmenter.num_classes,
            "class_names": segmenter.class_names,
            "num_prefix_tokens": segmenter.num_prefix_tokens,
            "lora_targets": list(spec.lora_targets),
            "preprocessing": spec.preprocessing(),
            **(extra or {}),
        },
    )
    return out_dir
