"""Embedding throughput of ``vembed embed`` (batched DataLoader) vs a naive one-image-at-a-time loop.

    python bench/bench_embed.py                     # 1,000 generated 64x64 images, tiny local DINOv2
    python bench/bench_embed.py --n 5000 --hidden 384 --layers 12 --image-size 224

Both paths use the same model, decoder (``load_image``) and eval transform, and are timed after the
model is loaded, in the same process, on the same images:

- vembed: :func:`vembed.index.embed.embed_to_store` (DataLoader workers decode while the model runs
  on batches of ``--batch-size``; the store is written atomically at the end, included in the time);
- naive: for each image, load → transform → ``encode`` a batch of one; measured with torch's default
  threads and again with one thread (at batch 1, thread hand-offs cost more than they save).

Each path runs ``--repeat`` times and the fastest run counts (other work on the machine adds noise).

The two sets of embeddings are checked to agree. Then every image searches the store (its own model
re-embeds it, exact search) and the rank-1 self-hit rate is reported; finally the same two steps run
through the real CLI (``python -m vembed embed`` / ``search``) as a user would type them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vembed.data.images import EvalTransform, load_image
from vembed.index.embed import embed_to_store
from vembed.index.search import Query, search_queries
from vembed.index.sources import records_from_source
from vembed.index.store import open_store
from vembed.models.factory import create_embedder
from vembed.settings import load_settings


def make_images(folder: Path, n: int, size: int, classes: int = 20) -> None:
    """``n`` distinct pictures (class colour and stripes, per-image noise) in ``classes`` sub-folders."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        label = i % classes
        hue = np.array([(label * 67) % 256, (label * 131 + 80) % 256, (label * 29 + 160) % 256], float)
        stripes = np.sin((xx if label % 2 else yy) * (0.3 + 0.1 * (label % 5)))[..., None]
        arr = hue * (0.6 + 0.4 * stripes) + rng.normal(0, 20, (size, size, 3))
        out = folder / f"class_{label:02d}" / f"img_{i:05d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(out)


def save_model(path: Path, hidden: int, layers: int, image_size: int) -> Path:
    """A randomly initialised DINOv2 saved like a hub checkpoint (no download)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Dinov2Config(
        image_size=image_size,
        patch_size=14,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64) if hidden >= 64 else 2,
        intermediate_size=4 * hidden,
    )
    tf.Dinov2Model(config).save_pretrained(path)
    return path


def naive_loop(embedder, records) -> tuple[torch.Tensor, float]:
    transform = EvalTransform(embedder.spec)
    start = time.perf_counter()
    out = [embedder.encode(transform(load_image(r.image))[None]) for r in records]
    return torch.cat(out), time.perf_counter() - start


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vembed", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"vembed {' '.join(args)} failed:\n{done.stderr}")
    return done, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--hidden", type=int, default=32, help="model width (32: the test model)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--image-size", type=int, default=28, help="model input size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each path; the best counts")
    parser.add_argument("--skip-cli", action="store_true", help="skip the end-to-end CLI runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "images", args.n, args.size)
        model = save_model(root / "model", args.hidden, args.layers, args.image_size)
        settings = load_settings(
            values={"data.num_workers": args.num_workers, "index.batch_size": args.batch_size}
        )
        embedder = create_embedder(str(model), settings.model)
        records, _ = records_from_source(root / "images")
        print(
            f"{len(records)} images {args.size}x{args.size}, DINOv2 hidden={args.hidden} layers={args.layers} "
            f"input={args.image_size}px, torch threads={torch.get_num_threads()}",
            file=sys.stderr,
        )

        naive_loop(embedder, records[: min(50, len(records))])  # warm-up
        naive_s = naive_1t_s = vembed_s = float("inf")
        threads = torch.get_num_threads()
        for _ in range(args.repeat):  # best of --repeat: the machine may be busy with other work
            naive_emb, seconds = naive_loop(embedder, records)
            naive_s = min(naive_s, seconds)
            torch.set_num_threads(
                1
            )  # the naive loop again, without intra-op threads (often faster at batch 1)
            seconds = naive_loop(embedder, records)[1]
            naive_1t_s = min(naive_1t_s, seconds)
            torch.set_num_threads(threads)
            store, summary = embed_to_store(
                embedder,
                records,
                root / "store",
                model=str(model),
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                show_progress=False,
            )
            vembed_s = min(vembed_s, summary.seconds)
        max_diff = (store.embeddings - naive_emb).abs().max().item()

        start = time.perf_counter()
        queries = [Query(str(r.image), r.image) for r in records]
        report = search_queries(open_store(root / "store"), queries, settings, k=1, show_progress=False)
        search_s = time.perf_counter() - start
        hits = sum(r.hits[0].path == str(r.query.path.resolve()) for r in report.results)

        result = {
            "images": len(records),
            "naive_img_per_s": round(len(records) / naive_s, 1),
            "vembed_img_per_s": round(len(records) / vembed_s, 1),
            "naive_1_thread_img_per_s": round(len(records) / naive_1t_s, 1),
            "speedup": round(naive_s / vembed_s, 2),
            "speedup_vs_naive_1_thread": round(naive_1t_s / vembed_s, 2),
            "max_abs_diff_vs_naive": max_diff,
            "search_s": round(search_s, 2),
            "rank1_self_hit_rate": hits / len(records),
        }
        if not args.skip_cli:
            store_dir = root / "cli-store"
            _, embed_wall = run_cli(
                "embed", str(root / "images"), "--model", str(model), "--out", str(store_dir), "-q",
                f"index.batch_size={args.batch_size}", f"data.num_workers={args.num_workers}",
            )  # fmt: skip
            done, search_wall = run_cli(
                "search", str(store_dir), str(root / "images"), "--k", "1", "--jsonl", "-q"
            )
            rows = [json.loads(line) for line in done.stdout.splitlines()]
            cli_hits = sum(r["rank"] == 1 and r["path"] == str(Path(r["query"]).resolve()) for r in rows)
            result.update(
                cli_embed_wall_s=round(embed_wall, 2),
                cli_search_wall_s=round(search_wall, 2),
                cli_rank1_self_hit_rate=cli_hits / len(records),
            )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
