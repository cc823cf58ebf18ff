"""Export of a fine-tuned dual encoder: plain transformers reloads both towers; ONNX graph per tower."""

from __future__ import annotations

import json

import pytest
import torch
from dual_helpers import save_tiny_dual

from vembed.export import export_model
from vembed.export_dual import CHECK_TEXTS, IMAGE_ONNX, TEXT_ONNX, transformers_embeddings
from vembed.models.dual import apply_method, load_dual_encoder, save_dual_encoder


@pytest.fixture(scope="module", params=["clip", "siglip"])
def lora_dual(request, tmp_path_factory):
    """A saved dual encoder whose (random, non-zero) LoRA adapters were merged on saving."""
    root = tmp_path_factory.mktemp(request.param)
    enc = apply_method(
        load_dual_encoder(str(save_tiny_dual(root / "base", request.param)), device="cpu", dtype="float32"),
        "lora",
        "both",
    )
    torch.manual_seed(1)
    for name, p in enc.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return save_dual_encoder(enc, root / "final", extra={"training": {"task": "image_text"}})


def test_export_reloads_with_plain_transformers(lora_dual, tmp_path):
    out = tmp_path / "export"
    result = export_model(lora_dual, out)
    assert result.max_abs_diff <= 1e-5
    source = load_dual_encoder(str(lora_dual), device="cpu", dtype="float32")
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    image, text = transformers_embeddings(out, pixels, CHECK_TEXTS, source.towers.text_padding, 16)
    assert float((image - source.encode(pixels)).abs().max()) <= 1e-5
    assert float((text - source.encode_text(CHECK_TEXTS)).abs().max()) <= 1e-5
    config = json.loads((out / "vembed.json").read_text())
    assert "dual_encoder" in config and config["export"]["checked_with"] == "transformers.AutoModel"
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "README.md",
    } <= set(result.files)
    from transformers import AutoImageProcessor

    assert AutoImageProcessor.from_pretrained(out).size  # the preprocessing travels with the export


def test_export_onnx_one_graph_per_tower(lora_dual, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    out = tmp_path / "onnx"
    result = export_model(lora_dual, out, onnx=True)
    assert result.onnx_max_abs_diff <= 1e-4
    source = load_dual_encoder(str(lora_dual), device="cpu", dtype="float32")
    image = onnxruntime.InferenceSession(str(out / IMAGE_ONNX), providers=["CPUExecutionProvider"])
    text = onnxruntime.InferenceSession(str(out / TEXT_ONNX), providers=["CPUExecutionProvider"])
    pixels = torch.randn(4, 3, 28, 28)
    got = image.run(["embeddings"], {"pixel_values": pixels.numpy()})[0]
    assert float((torch.from_numpy(got) - source.encode(pixels)).abs().max()) <= 1e-4
    tokens = source.tokenize(["a red one", "the digit nine written in blue ink", "a"])
    got = text.run(["embeddings"], {k: v.numpy() for k, v in tokens.items()})[0]
    assert (
        float(
            (
                torch.from_numpy(got)
                - source.encode_text(["a red one", "the digit nine written in blue ink", "a"])
            )
            .abs()
            .max()
        )
        <= 1e-4
    )
