"""Embedding throughput: vembed's batched path vs a naive loop, bf16 vs fp32, and MFU on a GPU.

Figures (same model, decoder and eval transform for every path, timed after loading, best of N):

- vembed (:func:`vembed.inference.embed_records`: DataLoader workers decode while the model runs on
  batches) vs a naive loop (load → transform → ``encode`` one image at a time), tiny model at 28 px;
- ``model.dtype=bfloat16`` vs ``float32`` on the profile's model (CPU: ViT-S/14 at 224 px; GPU:
  ViT-B/14 at 224 px), with the cosine of the bf16 embeddings to the fp32 ones;
- GPU only: model-FLOPs utilisation of the bf16 forward (DINOv2-B/14 at 224 px ≈ 46 GFLOP/image)
  against the card's dense bf16 peak; the target is ≥ 40 %.
"""

from __future__ import annotations

import torch

from bench.common import Figure, Profile, best_time, cuda_sync, log, make_records, save_model

ORDER = 10
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of the cards the GPU profile may meet.
GPU_BF16_PEAK = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def forward_flops(hidden: int, layers: int, mlp: int, tokens: int) -> float:
    """Multiply-adds × 2 of one ViT forward: QKV/out projections, attention, MLP (per image)."""
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * mlp) + 2 * 2 * tokens * tokens * hidden
    return layers * per_layer


def naive_loop(embedder, records) -> torch.Tensor:
    from vembed.data.images import EvalTransform, load_image

    transform = EvalTransform(embedder.spec)
    return torch.cat([embedder.encode(transform(load_image(r.image))[None]) for r in records])


def _records(path):
    from vembed.data.records import read_records

    return read_records(path).images()


def run(profile: Profile) -> list[Figure]:
    from vembed.inference import embed_records
    from vembed.models.factory import create_embedder
    from vembed.settings import ModelSettings

    figures = []
    device = profile.device
    sync = cuda_sync if device == "cuda" else None
    workers = 2 if device == "cpu" else 8

    # 1. batched vembed vs a naive loop (tiny model, small PNGs: the pipeline, not the model)
    tiny = save_model(profile.workdir / "tiny", "tiny")
    records = _records(make_records(profile.workdir / "png", profile.images, 64))
    embedder = create_embedder(str(tiny), ModelSettings(device=device, dtype="float32"))
    batched = best_time(
        lambda: embed_records(embedder, records, num_workers=workers, show_progress=False),
        profile.repeat,
        sync=sync,
    )
    naive = best_time(lambda: naive_loop(embedder, records), profile.repeat, sync=sync)
    n = len(records)
    figures.append(
        Figure("embed", "embed img/s, tiny model 28 px, 64 px PNGs", n / batched, n / naive,
               "naive 1-image loop", "img/s", note=f"{workers} workers, batch 64")
    )  # fmt: skip

    # 2. bf16 vs fp32 on the profile's real shape
    size = {"cpu": "small", "smoke": "tiny"}.get(profile.name, profile.model)
    model = save_model(profile.workdir / size, size)
    count = {"cpu": 48, "smoke": 16}.get(profile.name, 512)
    photos = _records(make_records(profile.workdir / "jpg", count, (400, 800), fmt="jpg"))
    out = {}
    times = {}
    for dtype in ("float32", "bfloat16"):
        embedder = create_embedder(str(model), ModelSettings(device=device, dtype=dtype))
        batch = 32 if device == "cpu" else 256

        def go(embedder=embedder, batch=batch, dtype=dtype):
            out[dtype] = embed_records(
                embedder, photos, batch_size=batch, num_workers=workers, show_progress=False
            ).embeddings

        times[dtype] = best_time(go, profile.repeat, sync=sync)
        log(f"embed {size} {dtype}: {count / times[dtype]:.1f} img/s")
    cosine = torch.nn.functional.cosine_similarity(out["float32"], out["bfloat16"]).min().item()
    figures.append(
        Figure("embed", f"embed img/s, ViT-{size[0].upper()}/14 224 px, bf16 vs fp32",
               count / times["bfloat16"], count / times["float32"], "fp32", "img/s",
               note=f"min cosine bf16↔fp32 {cosine:.4f}")
    )  # fmt: skip

    # 3. GPU: model-FLOPs utilisation of the bf16 forward alone (no decoding), at batch 256
    if device == "cuda":
        figures.append(_mfu(model, size))
    return figures


def _mfu(model, size: str) -> Figure:
    from bench.common import SIZES
    from vembed.models.factory import create_embedder
    from vembed.settings import ModelSettings

    hidden, layers, _, mlp, image_size = SIZES[size]
    embedder = create_embedder(str(model), ModelSettings(device="cuda", dtype="bfloat16"))
    batch = 256
    pixels = torch.randn(batch, 3, image_size, image_size, device="cuda", dtype=torch.bfloat16)
    seconds = best_time(lambda: embedder.encode(pixels), 5, sync=cuda_sync) / batch
    tokens = (image_size // 14) ** 2 + 1
    achieved = forward_flops(hidden, layers, mlp, tokens) / seconds / 1e12
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in GPU_BF16_PEAK.items() if k in name), float("nan"))
    return Figure("embed", f"embed model-FLOPs utilisation, ViT-{size[0].upper()}/14 bf16, batch {batch}",
                  achieved, peak, f"{name} dense bf16 peak", "TFLOP/s", target=0.40,
                  note=f"{forward_flops(hidden, layers, mlp, tokens) / 1e9:.0f} GFLOP/image")  # fmt: skip
