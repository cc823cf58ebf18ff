"""What ``vembed export`` adds for a segmentation model: a reload check of the decoder's logits and
the model card's segmentation section (the encoder part of the card is the embedding model's)."""

from __future__ import annotations

from pathlib import Path

import torch

from vembed.errors import VembedError

LOGITS_ATOL = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2e-1}


def is_segmentation_head(task_head: dict | None) -> bool:
    return bool(task_head) and task_head.get("kind") == "segmenter"


def check_segmentation_export(source: str | Path, out: Path, dtype: str) -> float:
    """Max abs difference between the source's and the export's logits on a fixed batch."""
    from vembed.models.segfactory import create_segmenter
    from vembed.settings import ModelSettings

    settings = ModelSettings(device="cpu", dtype="float32")
    before, after = create_segmenter(source, settings), create_segmenter(out, settings)
    size = before.spec.image_size
    batch = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    diff = float((before.predict(batch) - after.predict(batch)).abs().max())
    if diff > LOGITS_ATOL[dtype]:
        raise VembedError(
            f"the exported segmentation model's logits differ from {source}'s by {diff:.2e} "
            f"(allowed {LOGITS_ATOL[dtype]:.0e}); do not use {out}"
        )
    return diff


def segmentation_card(config: dict) -> str:
    """The model card's section on the decoder: vembed commands and the decoder's weights."""
    head = config["task_head"]
    names = ", ".join(head["class_names"][:12]) + (", ..." if head["num_classes"] > 12 else "")
    size = config["preprocessing"]["image_size"]
    linear = (
        "\nThe decoder is one 1x1 convolution on the last layer's patch tokens (prefix tokens dropped):\n\n"
        "```python\n"
        "from safetensors.torch import load_file\n"
        'w = load_file(f"{path}/vembed_head.safetensors")\n'
        f"tokens = out.last_hidden_state[:, {config['num_prefix_tokens']}:]          # [N, h*w, C]\n"
        'logits = tokens @ w["task_head.classifier.weight"][:, :, 0, 0].T + w["task_head.classifier.bias"]\n'
        "# reshape to [N, h, w, K], upsample (bilinear) to the input size, argmax over K\n"
        "```\n"
        if head["decoder"] == "linear"
        else "\nThe FPN decoder (layers "
        + ", ".join(str(i) for i in head["layers"])
        + ") is vembed's `FPNDecoder`; load the whole model with vembed.\n"
    )
    return f"""
## Segmentation

This folder is also a semantic segmentation model: the encoder above plus a `{head["decoder"]}` decoder
(`vembed_head.safetensors`, keys `task_head.*`) for {head["num_classes"]} classes ({names}),
input {size} x {size} px (the whole image resized, no crop).

With vembed: `vembed predict-masks PATH images/ --out masks/ --overlay`,
`vembed eval segmentation --model PATH --data val.jsonl --corruptions all`, or in Python
`vembed.models.segfactory.create_segmenter(PATH)`.
{linear}"""
