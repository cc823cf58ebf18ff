"""model.dtype=auto: bf16 where the hardware computes it, and bf16 retrieval quality close to fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from PIL import Image

from vembed.evaluation.options import retrieval_setup
from vembed.evaluation.run import evaluate_retrieval
from vembed.models import precision
from vembed.models.factory import create_embedder
from vembed.models.precision import cpu_bf16_reason, cpu_has_native_bf16, resolve_dtype
from vembed.settings import ModelSettings, load_settings


@pytest.mark.parametrize("forced, expected", [("1", torch.bfloat16), ("0", torch.float32)])
def test_auto_follows_the_cpu(monkeypatch, forced, expected):
    monkeypatch.setenv(precision.ENV_OVERRIDE, forced)
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32


def test_detection_reads_the_cpu_flags(monkeypatch):
    monkeypatch.delenv(precision.ENV_OVERRIDE, raising=False)
    flags = precision.cpu_flags()
    x86 = bool(flags & set(precision.X86_BF16_FLAGS))
    arm = bool(flags & set(precision.ARM_BF16_FLAGS))
    if not (x86 or arm):
        assert not cpu_has_native_bf16()
    assert ("native bf16" in cpu_bf16_reason()) == cpu_has_native_bf16()


def test_auto_model_dtype_on_cpu(tiny_model, monkeypatch):
    monkeypatch.delenv(precision.ENV_OVERRIDE, raising=False)
    embedder = create_embedder(str(tiny_model), ModelSettings(device="cpu"))
    assert embedder.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)


def _digits(root: Path) -> Path:
    """scikit-learn's 1,797 handwritten digits (8×8) as 32 px PNG files with their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        img = Image.fromarray((pixels / 16 * 255).astype(np.uint8), "L")
        img.resize((32, 32), Image.Resampling.BILINEAR).save(root / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "label": int(label)}))
    (root / "digits.jsonl").write_text("\n".join(lines) + "\n")
    return root / "digits.jsonl"


@pytest.mark.skipif(not cpu_has_native_bf16(), reason=cpu_bf16_reason())
def test_bf16_recall_matches_fp32_on_real_images(tmp_path):
    """bf16 embeddings of real images rank within 0.5 Recall@1 point of fp32 (all-vs-all)."""
    records = _digits(tmp_path / "digits")
    model = save_tiny_model(tmp_path / "model")
    recall = {}
    for dtype in ("float32", "bfloat16"):
        settings = load_settings(None, [f"model.dtype={dtype}", "model.device=cpu", "data.num_workers=0"])
        report = evaluate_retrieval(str(model), records, **retrieval_setup(settings), show_progress=False)
        recall[dtype] = report.metrics["recall@1"]
    assert recall["float32"] > 0.5  # the model separates digits, so the comparison means something
    assert abs(recall["bfloat16"] - recall["float32"]) <= 0.005, recall
