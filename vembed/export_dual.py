"""``vembed export`` of a dual encoder (a run of ``train.task=image_text``): both towers, LoRA merged.

The folder is a plain transformers checkpoint — ``AutoModel`` + ``AutoTokenizer`` (and
``AutoImageProcessor``) load it and give the same image and text embeddings (checked here against the
source model, fp32 max abs difference <= 1e-5) — plus ``vembed.json``. With ``onnx`` it also holds one
graph per tower, ``image_encoder.onnx`` (pixel_values → image embeddings) and ``text_encoder.onnx``
(input_ids [, attention_mask] → text embeddings), both normalised and checked with onnxruntime.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vembed.console import log
from vembed.errors import VembedError
from vembed.export_onnx import RELOAD_ATOL, ExportResult, check_batch, onnx_diff, onnx_export, write_onnx
from vembed.io import atomic_dir, make_readable, write_text
from vembed.models.dual import DualEncoder, load_dual_encoder, merged, save_dual_encoder
from vembed.models.loader import LoadedModel, read_model_config, write_model_config

IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
CHECK_TEXTS = ["a photo of a dog", "two red chairs next to a window", "a"]

__all__ = ["IMAGE_ONNX", "TEXT_ONNX", "export_dual_encoder", "transformers_embeddings"]


def transformers_embeddings(
    folder: Path, pixels: torch.Tensor, texts: list[str], padding: str, max_length: int
):
    """Normalised image and text embeddings of ``folder`` loaded by plain transformers (no vembed)."""
    import transformers

    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokens = tokenizer(texts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    inputs = {"input_ids": tokens["input_ids"]}
    if padding != "max_length":
        inputs["attention_mask"] = tokens["attention_mask"]
    with torch.inference_mode():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(**inputs)
    pooled = [x if isinstance(x, torch.Tensor) else x.pooler_output for x in (image, text)]
    return F.normalize(pooled[0].float(), dim=-1), F.normalize(pooled[1].float(), dim=-1)


def export_if_dual(source, model, run_dir, out, dtype, onnx, opset, start):
    """:func:`export_dual_encoder` when ``model`` is a dual encoder vembed saved, else ``None``."""
    import time

    from vembed.models.dual import is_saved_dual_encoder
    from vembed.models.loader import load_model

    loaded = load_model(model, weights=False)
    if not is_saved_dual_encoder(loaded):
        return None
    extra = {k: v for k, v in loaded.config.extra.items() if k not in ("export", "exported_from")}
    extra["exported_from"] = str(run_dir or model)
    settings_file = run_dir / "settings.yaml" if run_dir is not None else None
    result = export_dual_encoder(
        loaded,
        out,
        dtype=dtype,
        onnx=onnx,
        opset=opset,
        extra=extra,
        settings_file=settings_file if settings_file and settings_file.is_file() else None,
    )
    result.source, result.model, result.seconds = str(source), model, time.perf_counter() - start
    return result


def export_dual_encoder(
    loaded: LoadedModel,
    out: Path,
    *,
    dtype: str,
    onnx: bool,
    opset: int,
    extra: dict,
    settings_file: Path | None = None,
):
    """Write the export of a saved dual encoder; returns an :class:`vembed.export.ExportResult`."""
    encoder = merged(load_dual_encoder(loaded, device="cpu", dtype="float32")).eval()
    pixels = check_batch(encoder)
    with torch.inference_mode():
        image_ref = encoder(pixel_values=pixels).float()
    text_ref = encoder.encode_text(CHECK_TEXTS)
    info: dict = {"dtype": dtype, "check_batch": list(pixels.shape), "check_texts": len(CHECK_TEXTS)}
    onnx_diff = None
    with atomic_dir(out) as tmp:
        if onnx:
            log("writing the image and text ONNX graphs and checking them against PyTorch (onnxruntime)")
            image_diff = write_onnx(encoder, tmp / IMAGE_ONNX, pixels, image_ref, opset)
            text_diff = _write_text_onnx(encoder, tmp / TEXT_ONNX, opset)
            onnx_diff = max(image_diff, text_diff)
            info["onnx"] = {
                "image": {"file": IMAGE_ONNX, "input": "pixel_values", "output": "embeddings",
                          "max_abs_diff": image_diff},
                "text": {"file": TEXT_ONNX, "inputs": list(encoder.tokenize(["a"])), "output": "embeddings",
                         "max_abs_diff": text_diff},
                "opset": opset,
            }  # fmt: skip
        save_dual_encoder(encoder, tmp, dtype=getattr(torch, dtype), extra={**extra, "export": info})
        if settings_file is not None:
            shutil.copyfile(settings_file, tmp / "training_settings.yaml")
        image, text = transformers_embeddings(
            tmp, pixels, CHECK_TEXTS, encoder.towers.text_padding, encoder.max_text_length
        )
        diff = max(float((image - image_ref).abs().max()), float((text - text_ref).abs().max()))
        if diff > RELOAD_ATOL[dtype]:
            raise VembedError(
                f"the exported {dtype} dual encoder, loaded by plain transformers, differs from the source by "
                f"{diff:.2e} (max abs, allowed {RELOAD_ATOL[dtype]:.0e}); nothing was written to {out}"
            )
        info.update(max_abs_diff=diff, atol=RELOAD_ATOL[dtype], checked_with="transformers.AutoModel")
        config = read_model_config(tmp)
        config.extra["export"] = info
        write_model_config(tmp, config)
        write_text(tmp / "README.md", _card(encoder, onnx))
        make_readable(tmp)
        files = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
    return ExportResult(
        source=str(loaded.ref.text),
        model=loaded.ref.name,
        out_dir=out,
        dtype=dtype,
        embed_dim=encoder.embed_dim,
        max_abs_diff=diff,
        onnx_path=out / IMAGE_ONNX if onnx else None,
        onnx_max_abs_diff=onnx_diff,
        files=files,
    )


class _TextTower(nn.Module):
    def __init__(self, encoder: DualEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask=None):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask)


def _write_text_onnx(encoder: DualEncoder, path: Path, opset: int) -> float:
    """``text_encoder.onnx`` (dynamic batch; dynamic length unless captions are padded to a fixed one)."""
    tokens = encoder.tokenize(CHECK_TEXTS[:2])
    names = list(tokens)
    batch = torch.export.Dim("batch", min=1)
    dims = {0: batch}
    if encoder.towers.text_padding != "max_length":
        dims[1] = torch.export.Dim("length", min=2, max=encoder.max_text_length)
    session = onnx_export(
        _TextTower(encoder),
        tuple(tokens[n] for n in names),
        path,
        input_names=names,
        dynamic_shapes={n: dict(dims) for n in names},
        opset=opset,
        external_data=True,  # torch.onnx.export's default, as this export always had
        what="ONNX export of the text tower",
    )
    check = encoder.tokenize(CHECK_TEXTS)  # another batch size (and length) than the traced one
    got = torch.from_numpy(session.run(["embeddings"], {n: check[n].numpy() for n in names})[0])
    return onnx_diff(got, encoder.encode_text(CHECK_TEXTS), "text ONNX output")


def _card(encoder: DualEncoder, onnx: bool) -> str:
    padding = encoder.towers.text_padding
    mask = "" if padding == "max_length" else ", attention_mask=t['attention_mask']"
    lines = [
        f"# {encoder.spec.family} dual encoder exported by vembed",
        "",
        f"Image and text embeddings ({encoder.embed_dim}-d, L2-normalised) in one space.",
        "",
        "```python",
        "import torch, torch.nn.functional as F",
        "from transformers import AutoModel, AutoTokenizer, AutoImageProcessor",
        'model = AutoModel.from_pretrained("THIS_FOLDER").eval()',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
        'processor = AutoImageProcessor.from_pretrained("THIS_FOLDER")',
        f't = tokenizer(["a red chair"], padding="{padding}", max_length={encoder.max_text_length}, '
        'truncation=True, return_tensors="pt")',
        f"text = F.normalize(model.get_text_features(input_ids=t['input_ids']{mask}).pooler_output, dim=-1)",
        "```",
        "",
        "(transformers < 5 returns the features as a tensor: drop `.pooler_output`.)",
    ]
    if onnx:
        lines += [
            "",
            f"ONNX: `{IMAGE_ONNX}` (pixel_values) and `{TEXT_ONNX}` (token ids), normalised outputs.",
        ]
    return "\n".join(lines) + "\n"
