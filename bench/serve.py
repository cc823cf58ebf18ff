"""Serving and hand-off: ``vembed serve`` with dynamic batching vs one request at a time; store export rows/s.

- The same model served twice in this run by a real ``vembed serve`` process on a loopback port:
  ``--max-batch 32 --max-wait-ms 5`` (dynamic batching) and ``--max-batch 1`` (one request at a time),
  each answering the same single-image ``/v1/embed`` requests (JPEG photos) from 16 concurrent clients;
  requests/s and the clients' p50 / p99 latency. CPU profiles: a small DINOv2 shape (width 192, 6
  layers, 112 px) so the forward pass, not HTTP, is most of a request; GPU: ViT-B/14 bf16 at 224 px.
- ``vembed store export`` of a synthetic sharded store to Parquet (files read back and compared),
  LanceDB (IVF-PQ built past 100k rows) and Qdrant's local in-memory mode, rows/s without the
  top-10 self-check, against ``pyarrow.parquet.write_table`` of the same rows already in memory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from bench.common import Figure, Profile, log, make_records, save_model

ORDER = 80
SERVE_SHAPE = (192, 6, 3, 768, 112)  # hidden, layers, heads, mlp, image size (CPU profiles)
SIZES = {  # profile: (clients, requests per client, export rows, qdrant rows, dim)
    "smoke": (4, 5, 3_000, 1_000, 32),
    "cpu": (16, 25, 100_000, 20_000, 384),
    "gpu": (16, 125, 1_000_000, 20_000, 768),
}


def _model(profile: Profile):
    if profile.device == "cuda":
        return save_model(profile.workdir / "base", "base"), 224
    import torch
    import transformers as tf

    path = profile.workdir / "serve-model"
    hidden, layers, heads, mlp, size = SERVE_SHAPE
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = tf.Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                 intermediate_size=mlp, image_size=size, patch_size=14)  # fmt: skip
        tf.Dinov2Model(config).save_pretrained(path)
    return path, size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model, profile: Profile, *options: str):
    import httpx

    port = _free_port()
    dtype = "bfloat16" if profile.device == "cuda" else "float32"
    cmd = [sys.executable, "-m", "vembed", "serve", str(model), "--port", str(port), f"model.dtype={dtype}",
           f"model.device={profile.device}", *options]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vembed serve exited {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("vembed serve did not start")


def _load(url: str, photos: list[bytes], clients: int, per_client: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0

    async def client(worker: int):
        nonlocal errors
        async with httpx.AsyncClient(timeout=300) as session:
            for i in range(per_client):
                data = photos[(worker * per_client + i) % len(photos)]
                start = time.perf_counter()
                r = await session.post(url + "/v1/embed", files={"images": ("p.jpg", data, "image/jpeg")})
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200

    async def main():
        await asyncio.gather(*(client(w) for w in range(clients)))

    asyncio.run(_warm(url, photos))
    start = time.perf_counter()
    asyncio.run(main())
    seconds = time.perf_counter() - start
    stats = httpx.get(url + "/v1/info", timeout=30).json()["batching"]
    ms = np.array(latencies) * 1000
    return {"rps": len(latencies) / seconds, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "errors": errors, "mean_batch": stats["mean_batch"], "requests": len(latencies)}  # fmt: skip


async def _warm(url: str, photos: list[bytes]) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=300) as session:
        for data in photos[:4]:
            await session.post(url + "/v1/embed", files={"images": ("p.jpg", data, "image/jpeg")})


def _serve_figures(profile: Profile) -> list[Figure]:
    clients, per_client, *_ = SIZES.get(profile.name, SIZES["cpu"])
    model, size = _model(profile)
    records = make_records(profile.workdir / "photos", 32, (300, 600), fmt="jpg")
    photos = [p.read_bytes() for p in sorted((records.parent / "images").glob("*.jpg"))]
    results = {}
    for name, options in (
        ("batched", ("--max-batch", "32", "--max-wait-ms", "5")),
        ("single", ("--max-batch", "1")),
    ):
        proc, url = _start(model, profile, *options)
        try:
            results[name] = _load(url, photos, clients, per_client)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        log(f"serve {name}: {results[name]}")
    b, s = results["batched"], results["single"]
    shape = "ViT-B/14 bf16 224 px" if profile.device == "cuda" else f"DINOv2 w192 x6 {size} px fp32"
    what = f"{clients} clients x {per_client} single-image requests, {shape}"
    note = f"mean batch {b['mean_batch']:.1f} vs 1; errors {b['errors']} / {s['errors']}"
    return [
        Figure("serve", f"serve requests/s, {what}", b["rps"], s["rps"], "one request at a time (--max-batch 1)",
               "req/s", note=note, detail=results),
        Figure("serve", "serve p50 latency, same run", b["p50"], s["p50"], "one request at a time", "ms",
               higher_is_better=False),
        Figure("serve", "serve p99 latency, same run", b["p99"], s["p99"], "one request at a time", "ms",
               higher_is_better=False),
    ]  # fmt: skip


def _export_figures(profile: Profile) -> list[Figure]:
    import pyarrow.parquet as pq

    from vembed.handoff.lancedb import export_lancedb
    from vembed.handoff.parquet import export_parquet
    from vembed.handoff.qdrant import export_qdrant
    from vembed.handoff.rows import iter_tables, store_layout
    from vembed.index.vectors import write_vector_store

    _, _, rows, qdrant_rows, dim = SIZES.get(profile.name, SIZES["cpu"])
    rng = np.random.default_rng(0)

    def chunks(n):
        for lo in range(0, n, 10_000):
            x = rng.normal(size=(min(10_000, n - lo), dim)).astype(np.float32)
            yield x / np.linalg.norm(x, axis=1, keepdims=True)

    store = write_vector_store(
        profile.workdir / "store", chunks(rows), labels=[i % 1000 for i in range(rows)]
    )
    layout = store_layout(store)
    parquet = export_parquet(store, profile.workdir / "pq", show_progress=False)
    import pyarrow as pa

    whole = pa.concat_tables(list(iter_tables(layout)))  # the rows in memory first: not timed
    start = time.perf_counter()
    pq.write_table(whole, profile.workdir / "whole.parquet", compression="zstd")
    baseline = rows / (time.perf_counter() - start)
    del whole
    lance = export_lancedb(store, str(profile.workdir / "lancedb"), show_progress=False)
    log(
        f"export parquet {parquet.rows_per_second:.0f} rows/s, lancedb {lance.rows_per_second:.0f} rows/s; {lance.check}"
    )
    small = write_vector_store(profile.workdir / "qstore", chunks(qdrant_rows))
    # in memory: Qdrant's local *folder* mode commits each point to SQLite (~25 ms a point on this
    # disk), which measures the disk, not the export
    qdrant = export_qdrant(small, ":memory:", show_progress=False)
    log(f"export qdrant (local in-memory mode) {qdrant.rows_per_second:.0f} rows/s; {qdrant.check}")
    what = f"{rows:,} x {dim}-d, {layout.shards} shards"
    return [
        Figure("serve", f"store export → Parquet rows/s, {what}", parquet.rows_per_second, baseline,
               "pyarrow write_table of the rows already in memory", "rows/s",
               note="streamed from the store shard by shard, each file read back and compared"),
        Figure("serve", f"store export → LanceDB rows/s, {what}", lance.rows_per_second, parquet.rows_per_second,
               "vembed → Parquet", "rows/s", note=f"index: {lance.details['index'] and 'IVF_PQ'}; {lance.check}"),
        Figure("serve", f"store export → Qdrant (local, in memory) rows/s, {qdrant_rows:,} x {dim}-d",
               qdrant.rows_per_second, parquet.rows_per_second, "vembed → Parquet", "rows/s", note=qdrant.check),
    ]  # fmt: skip


def run(profile: Profile) -> list[Figure]:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    profile.workdir.mkdir(parents=True, exist_ok=True)
    return _serve_figures(profile) + _export_figures(profile)
