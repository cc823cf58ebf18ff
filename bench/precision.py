"""bf16 vs fp32 on real images: inference Recall@1 and CPU training (speed and quality).

Data: scikit-learn's 1,797 handwritten digits as 32 px PNG files (bundled with scikit-learn, no
download): even indices train, odd indices test. Model: a randomly initialised DINOv2 (hidden 64,
4 layers, 28 px), trained ``method=full`` with InfoNCE for a fixed number of steps, seed 0, then
evaluated all-vs-all on the test half:

- training with ``train.precision=bf16`` (autocast) vs ``no``: img/s, and test Recall@1 of each;
- inference of the fp32-trained model with ``model.dtype=bfloat16`` vs ``float32``: Recall@1.

bf16 training becomes the CPU default only if its Recall@1 stays within 0.5 point of fp32.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bench.common import Figure, Profile, log

ORDER = 45


def digits(root: Path) -> tuple[Path, Path]:
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    root.mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "test": []}
    for i, (pixels, label) in enumerate(zip(data.images, data.target, strict=True)):
        img = Image.fromarray((pixels / 16 * 255).astype(np.uint8), "L").resize((32, 32), Image.BILINEAR)
        img.save(root / f"{i}.png")
        rows["test" if i % 2 else "train"].append(json.dumps({"image": f"{i}.png", "label": int(label)}))
    for split, lines in rows.items():
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl", root / "test.jsonl"


def model(path: Path) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=256, image_size=28, patch_size=14)  # fmt: skip
    tf.Dinov2Model(config).save_pretrained(path)
    return path


def run(profile: Profile) -> list[Figure]:
    from vembed.evaluation.options import retrieval_setup
    from vembed.evaluation.run import evaluate_retrieval
    from vembed.settings import load_settings
    from vembed.training import train

    if profile.device != "cpu":
        return []  # a CPU question; the GPU profile trains in bf16 anyway (see the train case)
    train_file, test_file = digits(profile.workdir / "digits")
    base = model(profile.workdir / "model")
    steps = 12 if profile.name == "smoke" else 150
    results = {}
    for precision in ("no", "bf16"):
        out = profile.workdir / f"run-{precision}"
        settings = load_settings(None, [
            f"model.name={base}", "model.device=cpu", f"data.train={train_file}", "data.num_workers=0",
            f"train.output_dir={out}", "train.method=full", "train.loss=infonce", "train.batch_size=64",
            f"train.max_steps={steps}", f"train.precision={precision}", "train.eval_at_start=false",
            "train.lr=3e-4", "train.log_every=10", "train.seed=0",
        ])  # fmt: skip
        start = time.perf_counter()
        result = train(settings, show_progress=False)
        seconds = time.perf_counter() - start
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rates = [r["images_per_second"] for r in rows if r.get("kind") == "train" and r.get("step", 0) > 10]
        evaluation = load_settings(None, ["model.dtype=float32", "data.num_workers=0"])
        recall = evaluate_retrieval(
            str(result.final_dir), test_file, **retrieval_setup(evaluation), show_progress=False
        )
        results[precision] = {
            "img_per_s": float(np.median(rates)) if rates else steps * 64 / seconds,
            "recall@1": recall.metrics["recall@1"],
            "final": str(result.final_dir),
        }
        log(f"precision {precision}: {results[precision]}")
    inference = {}
    for dtype in ("float32", "bfloat16"):
        s = load_settings(None, [f"model.dtype={dtype}", "data.num_workers=0"])
        report = evaluate_retrieval(
            results["no"]["final"], test_file, **retrieval_setup(s), show_progress=False
        )
        inference[dtype] = report.metrics["recall@1"]
    fp32, bf16 = results["no"], results["bf16"]
    delta = 100 * (bf16["recall@1"] - fp32["recall@1"])
    return [
        Figure("precision", f"CPU training img/s, bf16 autocast vs fp32 (digits, ViT 64×4, {steps} steps)",
               bf16["img_per_s"], fp32["img_per_s"], "fp32", "img/s",
               note=f"test Recall@1 {bf16['recall@1']:.4f} vs {fp32['recall@1']:.4f} ({delta:+.2f} points)",
               detail=results),
        Figure("precision", "inference Recall@1, model.dtype=bfloat16 vs float32 (digits, trained model)",
               inference["bfloat16"], inference["float32"], "float32", "recall@1",
               note=f"{100 * (inference['bfloat16'] - inference['float32']):+.2f} points"),
    ]  # fmt: skip
