"""Train-step throughput of vembed's loop vs a plain transformers+peft loop, and bf16 autocast on CPU.

Both loops train the same randomly initialised DINOv2 (saved like a hub checkpoint, no download) with
LoRA (r 16 on q/k/v/o_proj) and InfoNCE on the same generated images (PNG files on disk), at the same
batch size, precision and number of torch threads:

- vembed: :func:`vembed.training.train` as ``vembed train`` runs it (accelerate, P x K batches, DataLoader
  workers decoding ahead), no validation;
- plain: transformers + peft + AdamW, each step decodes its images with Pillow in the training process,
  resizes and normalises them, forward, loss, backward, step (no accumulation, no workers, no tricks).

Throughput is images per second over the steps after the warm-up (vembed's own ``metrics.jsonl``
rows, the plain loop's step timer), best of the profile's repeats, interleaved. The target is vembed
≥ 1.5× plain. A second figure compares ``train.precision=bf16`` with ``no`` for vembed on the CPU.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.common import SIZES, Figure, Profile, log, make_records, save_model
from vembed.losses import build_loss
from vembed.settings import load_settings

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
ORDER = 40


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
            *args.extra,
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


def measure(profile: Profile, *, size: str, batch: int, precision: str, steps: int, warmup: int, images: int,
            plain: bool = True, extra: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """Best images/s of vembed (and of the plain loop), runs interleaved so drifting load hits both."""
    args = SimpleNamespace(
        size=size, batch=batch, precision=precision, steps=steps, warmup=warmup,
        workers=2 if profile.device == "cpu" else 8, device=profile.device, extra=extra,
    )  # fmt: skip
    model = save_model(profile.workdir / size, size)
    records = make_records(profile.workdir / f"png{size}", images, math.ceil(SIZES[size][4] * 8 / 7))
    best = {"vembed": 0.0, "plain": 0.0}
    for r in range(profile.repeat):
        if plain:
            best["plain"] = max(best["plain"], plain_loop(model, records, args)["images_per_second"])
        tag = f"{size}-{precision}-{r}-{len(list(profile.workdir.glob('run-*')))}"
        best["vembed"] = max(
            best["vembed"],
            vembed_loop(model, records, profile.workdir / f"run-{tag}", args)["images_per_second"],
        )
        log(f"train {size} {precision} {extra}: {best}")
    return best


def run(profile: Profile) -> list[Figure]:
    if profile.device == "cuda":
        size, batch, precision, images = profile.model, profile.batch, "bf16", profile.images
    else:
        size, batch, precision, images = profile.model, profile.batch, "no", profile.images
    common = dict(steps=profile.steps, warmup=profile.warmup)
    out = measure(profile, size=size, batch=batch, precision=precision, images=images, **common)
    what = f"train img/s, ViT {size} LoRA r16 InfoNCE, batch {batch}, precision {precision}"
    figures = [
        Figure("train", what, out["vembed"], out["plain"], "plain transformers+peft", "img/s", target=1.5)
    ]
    if profile.device == "cpu":  # bf16 autocast on the CPU, on the ViT-S shape (compute-bound)
        shape = "small" if profile.name == "cpu" else "tiny"
        small = dict(size=shape, batch=8, images=64, steps=3, warmup=1, plain=False)
        fp32 = measure(profile, precision="no", **small)["vembed"]
        bf16 = measure(profile, precision="bf16", **small)["vembed"]
        figures.append(Figure("train", f"train img/s, ViT {shape} LoRA, batch 8, bf16 autocast vs fp32",
                              bf16, fp32, "fp32", "img/s", note="quality: see the precision case"))  # fmt: skip
    return figures
