"""Train-step throughput of vembed's loop vs a plain training loop, as a ratio measured in one run.

    python bench/bench_train.py                                   # tiny DINOv2 (hidden 32, 2 layers, 28 px), CPU
    python bench/bench_train.py --size base --batch 128 --precision bf16 --images 2048   # dinov2-base shape, GPU

Both loops train the same randomly initialised DINOv2 (saved like a hub checkpoint, no download) with
LoRA (r 16 on q/k/v/o_proj) and InfoNCE on the same generated images (PNG files on disk), at the same
batch size, precision and number of torch threads:

- vembed: :func:`vembed.training.train` as ``vembed train`` runs it (accelerate, P x K batches, DataLoader
  workers decoding ahead, ``data.num_workers`` of them), no validation;
- plain: transformers + peft + AdamW, each step decodes its images with Pillow in the training process,
  resizes and normalises them, forward, loss, backward, step (no accumulation, no workers, no tricks).

Throughput is images per second over the steps after ``--warmup`` (steady state: vembed's own
``metrics.jsonl`` rows, the plain loop's step timer). On a GPU the peak allocated memory is reported too.
Each loop runs ``--repeat`` times and the best run counts (other work on the machine adds noise).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vembed.io import write_json
from vembed.losses import build_loss
from vembed.settings import load_settings

SIZES = {  # name: (hidden, layers, heads, mlp, image size)
    "tiny": (32, 2, 2, 64, 28),
    "small": (384, 12, 6, 1536, 224),
    "base": (768, 12, 12, 3072, 224),
}
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def save_model(path: Path, size: str) -> Path:
    import transformers as tf

    hidden, layers, heads, mlp, image_size = SIZES[size]
    torch.manual_seed(0)
    config = tf.Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        image_size=image_size,
        patch_size=14,
    )
    tf.Dinov2Model(config).save_pretrained(path)
    return path


def make_images(root: Path, n: int, size: int, per_class: int = 8) -> Path:
    """``n`` PNG pictures, ``per_class`` per class (colour + stripes + noise), and their records.jsonl."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    lines = []
    for i in range(n):
        label = i // per_class
        hue = np.array([(label * 67) % 256, (label * 131 + 80) % 256, (label * 29 + 160) % 256], float)
        stripes = np.sin((xx if label % 2 else yy) * (0.3 + 0.1 * (label % 5)))[..., None]
        arr = hue * (0.6 + 0.4 * stripes) + rng.normal(0, 20, (size, size, 3))
        path = root / "images" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
        lines.append(json.dumps({"image": f"images/{i:06d}.png", "label": label}))
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    return root / "records.jsonl"


def vembed_loop(model: Path, records: Path, out: Path, args) -> dict:
    from vembed.training import train

    steps = args.warmup + args.steps
    settings = load_settings(
        None,
        [
            f"model.name={model}",
            f"data.train={records}",
            f"data.num_workers={args.workers}",
            f"train.output_dir={out}",
            "train.method=lora",
            "train.loss=infonce",
            f"train.batch_size={args.batch}",
            f"train.max_steps={steps}",
            f"train.precision={args.precision}",
            "train.augment=false",  # the plain loop resizes + normalises only: same work per image
            "train.eval_at_start=false",
            f"train.log_every={args.warmup}",
        ],
    )
    _reset_peak_memory()
    train(settings, show_progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # one row per --warmup steps, each with the throughput of its window: drop the first (warm-up)
    windows = [(r["step"], r["images_per_second"]) for r in rows if r["kind"] == "train"]
    return {
        "images_per_second": _combine(windows, args.warmup, args.batch),
        "peak_memory_gib": _peak_memory(),
    }


def _combine(windows: list[tuple[int, float]], warmup: int, batch: int) -> float:
    """Images per second over the windows that start after ``warmup`` steps (by total time)."""
    images, seconds, previous = 0, 0.0, 0
    for step, rate in windows:
        n = (step - previous) * batch
        if previous >= warmup and rate > 0:
            images += n
            seconds += n / rate
        previous = step
    return images / seconds if seconds else float("nan")


def plain_loop(model: Path, records: Path, args) -> dict:
    """transformers + peft + AdamW; Pillow decoding inside the step."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    backbone = AutoModel.from_pretrained(model)
    backbone = get_peft_model(
        backbone,
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        ),
    ).to(device)
    backbone.train()
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = build_loss("infonce", embed_dim=backbone.config.hidden_size)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    size = SIZES[args.size][4]
    by_label: dict[int, list[str]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(str(records.parent / row["image"]))
    labels = sorted(by_label)
    rng = random.Random(0)
    _reset_peak_memory()
    seconds, images = 0.0, 0
    for step in range(args.warmup + args.steps):
        tic = time.perf_counter()
        chosen = rng.sample(labels, args.batch // 2)  # pairs: 2 images of each of batch/2 classes
        paths = [p for c in chosen for p in rng.sample(by_label[c], 2)]
        batch_labels = torch.tensor([c for c in chosen for _ in range(2)], device=device)
        arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in paths]
        pixels = torch.from_numpy(((np.stack(arrays) / 255.0 - MEAN) / STD).astype(np.float32))
        pixels = pixels.permute(0, 3, 1, 2).to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            embeddings = F.normalize(backbone(pixel_values=pixels).last_hidden_state[:, 0].float(), dim=-1)
        loss = loss_fn(embeddings, batch_labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in backbone.parameters() if p.requires_grad], 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        float(loss)  # wait for the step to finish (GPU)
        if step >= args.warmup:
            seconds += time.perf_counter() - tic
            images += len(paths)
    return {"images_per_second": images / seconds, "peak_memory_gib": _peak_memory()}


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="tiny", help="DINOv2 shape (random weights)."
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=512, help="Generated training images.")
    parser.add_argument("--steps", type=int, default=30, help="Timed steps (after --warmup).")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument(
        "--workers", type=int, default=2, help="vembed's DataLoader workers (data.num_workers)."
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for both loops (default: torch's)."
    )
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image_size = SIZES[args.size][4]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_model(tmp / "model", args.size)
        records = make_images(tmp / "data", args.images, size=math.ceil(image_size * 8 / 7))
        vembed_runs, plain_runs = [], []
        for r in range(args.repeat):  # interleaved, so drifting machine load hits both
            plain_runs.append(plain_loop(model, records, args))
            vembed_runs.append(vembed_loop(model, records, tmp / f"run{r}", args))
    best = lambda runs: max(runs, key=lambda x: x["images_per_second"])  # noqa: E731
    vembed, plain = best(vembed_runs), best(plain_runs)
    result = {
        "model": f"dinov2 {args.size} (random weights), LoRA r16, InfoNCE",
        "device": "cuda: " + torch.cuda.get_device_name()
        if torch.cuda.is_available() and args.device != "cpu"
        else "cpu",
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "precision": args.precision,
        "vembed_workers": args.workers,
        "vembed_img_per_s": round(vembed["images_per_second"], 1),
        "plain_img_per_s": round(plain["images_per_second"], 1),
        "ratio": round(vembed["images_per_second"] / plain["images_per_second"], 2),
        "vembed_runs": [round(x["images_per_second"], 1) for x in vembed_runs],
        "plain_runs": [round(x["images_per_second"], 1) for x in plain_runs],
        "vembed_peak_gib": vembed["peak_memory_gib"],
        "plain_peak_gib": plain["peak_memory_gib"],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
