"""Export a trained run (or any model folder) as a self-contained model folder, optionally with ONNX.

The folder is what ``save_model`` writes — ``config.json`` + ``model.safetensors`` (plain
``transformers.AutoModel.from_pretrained`` loads the backbone, LoRA already merged), ``vembed.json``
(pooling, projection, normalisation, preprocessing) and ``vembed_head.safetensors`` when there is a
head — plus ``preprocessor_config.json`` (so ``AutoImageProcessor`` reproduces vembed's eval
transform), a short model card, and with ``onnx=True`` a ``model.onnx`` graph (pixel values →
embeddings, dynamic batch axis) checked against PyTorch with onnxruntime.

Everything is written into a temporary folder that replaces ``out`` only once it is complete and
verified: the reloaded export must reproduce the source model's embeddings.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from vembed.console import log
from vembed.errors import VembedError
from vembed.export_onnx import (
    DTYPES,
    ONNX_ATOL,
    ONNX_FILE,
    ONNX_OPSET,
    RELOAD_ATOL,
    ExportResult,
    check_batch,
    write_onnx,
)
from vembed.io import atomic_dir, make_readable, write_json, write_text
from vembed.models.embedder import Embedder
from vembed.models.factory import ModelOptions, build_embedder, load_embedder, save_model
from vembed.models.heads import Head, load_head
from vembed.models.loader import (
    VEMBED_CONFIG,
    ModelConfig,
    load_model,
    read_model_config,
    resolve_ref,
    write_model_config,
)
from vembed.settings import ExportSettings

_RESAMPLE_CODES = {"bicubic": 3, "bilinear": 2}


def export_model(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    onnx: bool | None = None,
    opset: int = ONNX_OPSET,
    truncate_dim: int | None = None,
) -> ExportResult:
    """Export ``source`` (a run dir — its ``final/`` —, a model folder, registry name or hub id) to ``out``.

    ``dtype`` casts the saved backbone weights (``float32``, ``float16``, ``bfloat16``); ``onnx`` also
    writes ``model.onnx`` (always float32) and fails if onnxruntime's output differs from PyTorch's
    by more than ``ONNX_ATOL``. ``truncate_dim`` keeps the first N dims of the embedding (re-normalised;
    a Matryoshka width), recorded in ``vembed.json`` and part of the ONNX graph. Left as ``None`` they come from the run's ``export`` settings (its
    ``settings.yaml``), else float32 without ONNX. Raises :class:`VembedError` before writing anything
    on a bad source, a bad ``out`` or a missing onnxruntime.
    """
    start = time.perf_counter()
    ref = resolve_ref(source)
    model, run_dir = ref.name, ref.run_dir
    defaults = run_export_settings(run_dir)
    dtype = dtype if dtype is not None else defaults.dtype
    onnx = onnx if onnx is not None else defaults.onnx
    out = Path(out).expanduser()
    _check_inputs(model, run_dir, out, dtype, onnx)
    log(f"exporting [bold]{model}[/] → {out} ({dtype}{', onnx' if onnx else ''})")
    from vembed.export_dual import export_if_dual  # a dual encoder: both towers

    if (dual := export_if_dual(source, model, run_dir, out, dtype, onnx, opset, start)) is not None:
        return dual
    loaded = load_model(model)
    embedder = build_embedder(loaded, ModelOptions(device="cpu", dtype="float32", truncate_dim=truncate_dim))
    saved = loaded.config or ModelConfig()
    # write exactly what was read: the saved identity's other keys (training ...) and its task head
    extra = {k: v for k, v in saved.extra.items() if k not in ("export", "exported_from")}
    extra["exported_from"] = str(run_dir or model)
    head = load_head(loaded)
    settings_file = run_dir / "settings.yaml" if run_dir is not None else None
    result = _export(
        embedder,
        out,
        dtype=dtype,
        onnx=onnx,
        opset=opset,
        extra=extra,
        head=head,
        settings_file=settings_file if settings_file and settings_file.is_file() else None,
    )
    if head is not None:
        result.head_checks = head.check_export(model, out, dtype)
    result.source = str(source)
    result.model = model
    result.seconds = time.perf_counter() - start
    return result


def run_export_settings(run_dir: Path | None) -> ExportSettings:
    """The ``export`` section of a run's ``settings.yaml`` (defaults without a run or a section)."""
    path = run_dir / "settings.yaml" if run_dir is not None else None
    if path is None or not path.is_file():
        return ExportSettings()
    try:
        section = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("export") or {}
        return ExportSettings.model_validate(section)
    except (yaml.YAMLError, AttributeError) as exc:
        raise VembedError(f"{path}: cannot read the run's settings ({exc})") from None
    except ValidationError as exc:
        raise VembedError(f"{path}: export: {exc.errors()[0]['msg']}") from None


def export_embedder(
    embedder: Embedder,
    out: str | Path,
    *,
    dtype: str = "float32",
    onnx: bool = False,
    opset: int = ONNX_OPSET,
) -> ExportResult:
    """Export an in-memory :class:`Embedder`, LoRA adapters merged; ``embedder`` itself is left untouched."""
    start = time.perf_counter()
    out = Path(out).expanduser()
    _check_inputs(None, None, out, dtype, onnx)
    from vembed.models.lora import has_lora, merge_lora

    work = merge_lora(embedder) if has_lora(embedder) else copy.deepcopy(embedder)  # both copy
    work = work.to(device="cpu", dtype=torch.float32)
    result = _export(work, out, dtype=dtype, onnx=onnx, opset=opset, extra={"exported_from": "python"})
    result.seconds = time.perf_counter() - start
    return result


def _export(
    embedder: Embedder,
    out: Path,
    *,
    dtype: str,
    onnx: bool,
    opset: int,
    extra: dict,
    head: Head | None = None,
    settings_file: Path | None = None,
) -> ExportResult:
    leftover = [n for n, _ in embedder.named_parameters() if "lora_" in n]
    if leftover:
        raise VembedError(f"could not merge LoRA weights into the backbone: {', '.join(leftover[:3])} ...")
    embedder.eval()
    check = check_batch(embedder)
    with torch.inference_mode():
        reference = embedder(check).float()
    export_info: dict = {"dtype": dtype, "check_batch": list(check.shape)}
    with atomic_dir(out) as tmp:
        onnx_diff = None
        if onnx:
            log("writing the ONNX graph and checking it against PyTorch (onnxruntime)")
            onnx_diff = write_onnx(embedder, tmp / ONNX_FILE, check, reference, opset)
            export_info["onnx"] = {
                "file": ONNX_FILE,
                "dtype": "float32",
                "opset": opset,
                "input": "pixel_values",
                "output": "embeddings",
                "dynamic_axes": {"pixel_values": [0], "embeddings": [0]},
                "max_abs_diff": onnx_diff,
                "atol": ONNX_ATOL,
            }
        save_model(
            embedder, tmp, dtype=getattr(torch, dtype), extra={**extra, "export": export_info}, head=head
        )
        _write_preprocessor_config(embedder, tmp)
        if settings_file is not None:
            shutil.copyfile(settings_file, tmp / "training_settings.yaml")
        diff = _reload_diff(tmp, check, reference)
        if diff > RELOAD_ATOL[dtype]:
            raise VembedError(
                f"the exported {dtype} model differs from the source by {diff:.2e} (max abs, allowed "
                f"{RELOAD_ATOL[dtype]:.0e}); nothing was written to {out}"
            )
        export_info["max_abs_diff"] = diff
        export_info["atol"] = RELOAD_ATOL[dtype]
        config = read_model_config(tmp)
        config.extra["export"] = export_info
        write_model_config(tmp, config)
        write_text(tmp / "README.md", _model_card(config.to_json(), head))
        make_readable(tmp)
        files = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
    return ExportResult(
        source="python",
        model="python",
        out_dir=out,
        dtype=dtype,
        embed_dim=embedder.embed_dim,
        max_abs_diff=diff,
        onnx_path=out / ONNX_FILE if onnx else None,
        onnx_max_abs_diff=onnx_diff,
        files=files,
    )


def _check_inputs(model: str | None, run_dir: Path | None, out: Path, dtype: str, onnx: bool) -> None:
    """Every mistake that can be found before loading a model: bad dtype, bad ``out``, no onnxruntime."""
    if dtype not in DTYPES:
        raise VembedError(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    resolved = out.resolve()
    # out may live inside the run dir (RUN/export), but must neither replace nor sit inside the model
    for src, inside_ok in ((model, False), (run_dir, True)):
        if src is None or not Path(src).is_dir():
            continue
        src_path = Path(src).resolve()
        inside = src_path in resolved.parents
        if resolved == src_path or resolved in src_path.parents or (inside and not inside_ok):
            raise VembedError(f"--out {out} overlaps the source {src}; choose a separate folder")
    if out.is_file():
        raise VembedError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / VEMBED_CONFIG).is_file():
        raise VembedError(
            f"--out {out} exists and is not a vembed model folder; choose a new folder (it would be replaced)"
        )
    if onnx:
        for module, package in (
            ("onnxruntime", "onnxruntime"),
            ("onnx", "onnx"),
            ("onnxscript", "onnxscript"),
        ):
            try:
                __import__(module)
            except ImportError:
                raise VembedError(
                    f"--onnx needs the {package} package: pip install {package} (or pip install 'vembed[onnx]')"
                ) from None


def _reload_diff(folder: Path, check: torch.Tensor, reference: torch.Tensor) -> float:
    """Max abs difference between the reloaded export's embeddings (float32) and the reference."""
    reloaded = load_embedder(folder, device="cpu", dtype="float32")
    return float((reloaded.encode(check) - reference).abs().max())


def _write_preprocessor_config(embedder: Embedder, folder: Path) -> None:
    """A ``preprocessor_config.json`` that makes ``AutoImageProcessor`` do vembed's eval transform.

    CLIPImageProcessor does resize-shorter-side → centre crop, or (``size: {height, width}`` without a
    crop) a square resize, then rescale → normalise: :class:`vembed.data.images.EvalTransform` for
    every family.
    """
    spec = embedder.spec
    square = spec.resize == "square"
    write_json(
        folder / "preprocessor_config.json",
        {
            "image_processor_type": "CLIPImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"height": spec.image_size, "width": spec.image_size}
            if square
            else {"shortest_edge": spec.resize_size},
            "resample": _RESAMPLE_CODES.get(spec.interpolation, 3),
            "do_center_crop": not square,
            "crop_size": {"height": spec.image_size, "width": spec.image_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(spec.mean),
            "image_std": list(spec.std),
        },
    )


def _model_card(config: dict, head: Head | None = None) -> str:
    """A short README.md: what the folder holds and how to get vembed's embedding without vembed."""
    pooling = config["pooling"]
    pool_line = {
        "cls": "feats = out.last_hidden_state[:, 0]",
        "pooler": "feats = out.pooler_output",
        "mean": f"feats = out.last_hidden_state[:, {config['num_prefix_tokens']}:].mean(1)",
        "cls+mean": (
            "h = out.last_hidden_state\n"
            f"feats = torch.cat([h[:, 0], h[:, {config['num_prefix_tokens']}:].mean(1)], -1)"
        ),
        "gem": (
            'p = head["gem.p"].clamp(min=1)\n'
            f"t = out.last_hidden_state[:, {config['num_prefix_tokens']}:]\n"
            "m = t.amin(1) - 1e-6  # GeM over tokens shifted to be positive (see vembed's GeM)\n"
            "feats = (t - m[:, None]).pow(p).mean(1).pow(1 / p) + m"
        ),
    }[pooling]
    class_lines, class_text = head.card(config) if head is not None else ("", "")
    needs_head = pooling == "gem" or config.get("projection_dim") or class_lines
    head_lines = (
        'from safetensors.torch import load_file\nhead = load_file(f"{path}/vembed_head.safetensors")\n'
        if needs_head
        else ""
    )
    proj_line = (
        'feats = feats @ head["projection.weight"].T + head["projection.bias"]\n'
        if config.get("projection_dim")
        else ""
    )
    norm_line = "emb = torch.nn.functional.normalize(feats, dim=-1)" if config["normalize"] else "emb = feats"
    if config.get("truncate_dim"):
        width = config["truncate_dim"]
        norm_line = (
            f"emb = torch.nn.functional.normalize(feats[:, :{width}], dim=-1)  # the first {width} dims"
            if config["normalize"]
            else f"emb = feats[:, :{width}]  # the first {width} dims"
        )
    export = config.get("export", {})
    onnx = export.get("onnx")
    onnx_text = (
        f"\n`{onnx['file']}` takes `pixel_values` (float32, `[N, 3, {config['preprocessing']['image_size']}, "
        f"{config['preprocessing']['image_size']}]`, preprocessed as above) and returns `embeddings` "
        f"(`[N, {config['embed_dim']}]`); max abs difference to PyTorch at export: {onnx['max_abs_diff']:.1e}.\n"
        if onnx
        else ""
    )
    return f"""# vembed image embedding model

Exported by vembed {config.get("vembed_version", "")} from `{config.get("exported_from", "?")}`
(base model `{config.get("base_model", "?")}`, {config.get("family")} family).
Embedding: {config["embed_dim"]} dimensions, pooling `{pooling}`,
{"L2-normalised" if config["normalize"] else "not normalised"}; weights stored as {export.get("dtype", "float32")}.

With vembed: `vembed embed --model PATH ...`, `vembed search --model PATH ...`, `vembed eval retrieval --model PATH ...`.

With plain transformers:

```python
import torch
from PIL import Image, ImageOps
from transformers import AutoImageProcessor, AutoModel

path = "PATH"
model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
processor = AutoImageProcessor.from_pretrained(path)
{head_lines}images = [ImageOps.exif_transpose(Image.open(f)).convert("RGB") for f in ["a.jpg", "b.jpg"]]
with torch.no_grad():
    out = model(**processor(images, return_tensors="pt"))
{pool_line}
{proj_line}{norm_line}
{class_lines}```
{class_text}{onnx_text}"""
