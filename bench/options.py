"""Model and step options, each with and without: SDPA vs eager attention, torch.compile, fused AdamW,
gradient checkpointing, channels-last input, and GPU top-k for evaluation.

The model is a randomly initialised DINOv2 (CPU profile: ViT-S/14 at 224 px, batch 8, plus the tiny
shape for compiled training steps; GPU profile: ViT-B/14 at 224 px, batch 128, bf16 autocast). Each
figure times the same work both ways in this process; the step is forward + InfoNCE-like loss +
backward (+ AdamW step), as ``vembed train`` runs it with ``method=full``.
"""

from __future__ import annotations

import time

import torch

from bench.common import SIZES, Figure, Profile, best_time, cuda_sync, log, save_model

ORDER = 50


def _backbone(path, device, attention="auto"):
    from vembed.models.loader import load_backbone
    from vembed.models.loader import load_spec as resolve_spec

    return load_backbone(resolve_spec(str(path)), attention=attention).to(device)


def _step_fn(model, pixels, *, autocast_dtype, optimizer=None):
    def step():
        with torch.autocast(pixels.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(pixel_values=pixels).last_hidden_state[:, 0].float()
        emb = torch.nn.functional.normalize(out, dim=-1)
        loss = (emb @ emb.T).logsumexp(dim=1).mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    return step


def run(profile: Profile) -> list[Figure]:
    gpu = profile.device == "cuda"
    device = torch.device(profile.device)
    size = profile.model if gpu else ("small" if profile.name == "cpu" else "tiny")
    batch = profile.batch if gpu else 8
    amp = torch.bfloat16 if gpu else None
    sync = cuda_sync if gpu else None
    reps = max(2, profile.repeat)
    path = save_model(profile.workdir / size, size)
    image = SIZES[size][4]
    pixels = torch.randn(batch, 3, image, image, device=device)
    tag = f"ViT {size} {image} px, batch {batch}" + (", bf16" if gpu else ", fp32")
    figures = []

    # attention kernels: inference forward
    times = {}
    for attention in ("sdpa", "eager"):
        model = _backbone(path, device, attention).eval()
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=gpu):
            times[attention] = best_time(lambda m=model: m(pixel_values=pixels), reps, sync=sync)
    figures.append(Figure("options", f"forward, sdpa vs eager attention, {tag}", times["sdpa"],
                          times["eager"], "eager", "s", higher_is_better=False))  # fmt: skip
    if gpu:
        figures += _flash(path, device, pixels, amp, reps)

    # channels-last input (only the patch-embedding convolution sees it)
    model = _backbone(path, device).eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=gpu):
        nchw = best_time(lambda: model(pixel_values=pixels), reps, sync=sync)
        cl = pixels.contiguous(memory_format=torch.channels_last)
        nhwc = best_time(lambda: model(pixel_values=cl), reps, sync=sync)
    figures.append(Figure("options", f"forward, channels-last input, {tag}", nhwc, nchw, "contiguous",
                          "s", higher_is_better=False))  # fmt: skip

    # fused vs for-each AdamW: optimizer step over every weight
    model = _backbone(path, device).train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    step_times = {}
    for name, kwargs in (("fused", {"fused": True}), ("foreach", {"foreach": True})):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kwargs)
        step_times[name] = best_time(opt.step, reps * 3, sync=sync)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    figures.append(Figure("options", f"AdamW step, fused vs foreach, {params:.0f}M parameters",
                          step_times["fused"], step_times["foreach"], "foreach", "s",
                          higher_is_better=False))  # fmt: skip

    # gradient checkpointing: cost in step time (and memory saved on a GPU)
    step = {}
    memory = {}
    for checkpointing in (False, True):
        model = _backbone(path, device).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        step[checkpointing] = best_time(_step_fn(model, pixels, autocast_dtype=amp), reps, sync=sync)
        memory[checkpointing] = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    note = f"peak {memory[True]:.1f} vs {memory[False]:.1f} GiB" if gpu else ""
    figures.append(Figure("options", f"train step, gradient checkpointing, {tag}", step[True],
                          step[False], "without", "s", higher_is_better=False, note=note))  # fmt: skip

    # torch.compile: a training step (tiny shape on the CPU: compiling ViT-S there takes minutes)
    figures.append(_compiled_step(profile, device, amp, sync))

    if gpu:
        figures += _gpu_topk(profile)
    return figures


def _compiled_step(profile: Profile, device, amp, sync) -> Figure:
    gpu = device.type == "cuda"
    size = profile.model if gpu else "tiny"
    batch = profile.batch if gpu else 64
    path = save_model(profile.workdir / size, size)
    image = SIZES[size][4]
    pixels = torch.randn(batch, 3, image, image, device=device)
    times = {}
    compile_seconds = float("nan")
    for compiled in (False, True):
        model = _backbone(path, device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        if compiled:
            model = torch.compile(model)
            start = time.perf_counter()
            _step_fn(model, pixels, autocast_dtype=amp, optimizer=opt)()
            if sync:
                sync()
            compile_seconds = time.perf_counter() - start
        times[compiled] = best_time(
            _step_fn(model, pixels, autocast_dtype=amp, optimizer=opt), max(3, profile.repeat), sync=sync
        )
        log(f"compile={compiled}: {times[compiled] * 1000:.0f} ms/step")
    return Figure("options", f"train step, torch.compile, ViT {size} {image} px, batch {batch}",
                  times[True], times[False], "eager", "s", higher_is_better=False,
                  note=f"first step (compiling) {compile_seconds:.0f} s")  # fmt: skip


def _flash(path, device, pixels, amp, reps) -> list[Figure]:
    """flash_attention_2 (when the flash-attn package is installed) vs sdpa."""
    try:
        model = _backbone(path, device, "flash_attention_2").eval()
    except Exception as exc:  # noqa: BLE001 - the package is optional
        log(f"flash_attention_2 unavailable: {str(exc).splitlines()[0]}")
        return []
    sdpa = _backbone(path, device, "sdpa").eval()
    with torch.inference_mode(), torch.autocast("cuda", dtype=amp):
        flash = best_time(lambda: model(pixel_values=pixels), reps, sync=cuda_sync)
        base = best_time(lambda: sdpa(pixel_values=pixels), reps, sync=cuda_sync)
    return [Figure("options", "forward, flash_attention_2 vs sdpa", flash, base, "sdpa", "s",
                   higher_is_better=False)]  # fmt: skip


def _gpu_topk(profile: Profile) -> list[Figure]:
    """All-vs-all Recall@K on the GPU (retrieval_metrics on CUDA tensors) vs the CPU; faiss-GPU if any."""
    from bench.retrieval import KS, make_data
    from vembed.evaluation.retrieval import retrieval_metrics

    x, labels = make_data(profile.retrieval_n, profile.retrieval_dim)
    start = time.perf_counter()
    cpu = retrieval_metrics(x, labels, ks=KS)
    cpu_s = time.perf_counter() - start
    xg = x.cuda()
    retrieval_metrics(xg[:2000], labels[:2000], ks=KS)  # warm-up
    cuda_sync()
    start = time.perf_counter()
    gpu = retrieval_metrics(xg, labels, ks=KS)
    cuda_sync()
    gpu_s = time.perf_counter() - start
    same = all(abs(cpu[k] - gpu[k]) < 1e-3 for k in cpu if k.startswith("recall"))
    figures = [Figure("options", f"all-vs-all Recall@K on the GPU, {len(x):,}×{x.shape[1]}", gpu_s, cpu_s,
                      "same on the CPU", "s", higher_is_better=False,
                      note="same recall" if same else "recall differs (float ties)")]  # fmt: skip
    try:
        import faiss

        if faiss.get_num_gpus() > 0:
            res = faiss.StandardGpuResources()
            index = faiss.GpuIndexFlatIP(res, x.shape[1])
            index.add(x.numpy())
            start = time.perf_counter()
            index.search(x.numpy(), min(max(KS) + 1, 2048))
            faiss_s = time.perf_counter() - start
            figures.append(Figure("options", "all-vs-all search on the GPU vs faiss-GPU flat", gpu_s, faiss_s,
                                  "faiss GpuIndexFlatIP", "s", higher_is_better=False))  # fmt: skip
    except ImportError:
        log("faiss-GPU not installed: no faiss GPU figure")
    return figures
