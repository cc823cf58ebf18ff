"""Does a pairwise re-ranker (``train.task=rerank``) raise test Recall@1 on our two real small sets?

    python -m bench.rerank_quality                                  # digits and photos, seed 0
    python -m bench.rerank_quality --sets photos --seeds 0 1 --json rerank.json
    python -m bench.rerank_quality --sets photos --pairwise-backbone random   # not the embedder's backbone

The sets, the model and the embedder's training are ``bench/quality.py``'s (the quickstart's random-init
ViT, 32 px, full fine-tuning, batch 64, lr 3e-4; ``--loss``, ``--epochs``). Then a re-ranker is trained
from that embedder (``train.rerank_from`` = its ``final/``; the pairwise model starts from its backbone,
or from the untrained model with ``--pairwise-backbone random``) for ``--rerank-epochs`` on pairs mined
from its top ``--top-n`` on the training split, calibrated on the validation split. On the test split
(photos: unseen classes) it reports the embedding's Recall@1 and the re-ranked one at the calibrated
blend weight, and, to show what calibration is for, at fixed weights 0.5 and 1 (pure pairwise).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

from vembed.io import write_json
from vembed.settings import load_settings

WEIGHTS = ("calibrated", 0.5, 1.0)


def train_embedder(files: dict, model: Path, out: Path, *, loss: str, seed: int, epochs: int) -> Path:
    from vembed.training import train

    settings = load_settings(
        None,
        [
            f"model.name={model}", "model.pooling=mean", f"data.train={files['train']}",
            f"data.val={files['val']}", "data.num_workers=0", f"train.output_dir={out}", "train.method=full",
            f"train.loss={loss}", "train.batch_size=64", "train.lr=3e-4", f"train.epochs={epochs}",
            f"train.seed={seed}", "eval.k=1,10", "eval.batch_size=256",
        ],
    )  # fmt: skip
    return train(settings, show_progress=False).final_dir


def train_reranker(files: dict, embedder: Path, out: Path, *, backbone: Path | None, args, seed: int):
    from vembed.training import train

    overrides = [
        "train.task=rerank", f"train.rerank_from={embedder}", f"train.rerank_top_n={args.top_n}",
        f"data.train={files['train']}", f"data.val={files['val']}", "data.num_workers=0",
        f"train.output_dir={out}", "train.method=full", "train.batch_size=64", f"train.lr={args.lr}",
        f"train.epochs={args.rerank_epochs}", f"train.seed={seed}", "eval.batch_size=256",
    ]  # fmt: skip
    if backbone is not None:
        overrides += [f"model.name={backbone}", "model.pooling=mean"]
    return train(load_settings(None, overrides), show_progress=False)


def test_recalls(embedder: Path, reranker: Path, test: Path, top_n: int) -> dict:
    from vembed.evaluation.options import RetrievalOptions
    from vembed.evaluation.run import evaluate_retrieval
    from vembed.inference import EmbedOptions
    from vembed.rerank import load_reranker

    loaded = load_reranker(reranker, device="cpu", dtype="float32")
    out = {}
    for weight in WEIGHTS:
        r = copy.copy(loaded)
        if weight != "calibrated":
            r = copy.deepcopy(loaded)
            r.model.pair_head.blend_weight = float(weight)
        report = evaluate_retrieval(
            embedder,
            test,
            embed=EmbedOptions(batch_size=256, num_workers=0),
            options=RetrievalOptions(ks=(1, 10), rerank=r, top_n=top_n),
            show_progress=False,
        )
        out["embedding"] = report.before_rerank["recall@1"]
        out[f"w={weight}"] = report.metrics["recall@1"]
    out["blend_weight"] = loaded.weight
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.quality import build_model, make_digits, make_photos

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["digits", "photos"], choices=["digits", "photos"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--loss", default="multi_similarity", help="the embedder's train.loss")
    parser.add_argument("--epochs", type=int, default=10, help="the embedder's epochs")
    parser.add_argument("--rerank-epochs", type=int, default=5)
    parser.add_argument("--top-n", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-4, help="the re-ranker's train.lr")
    parser.add_argument("--pairwise-backbone", choices=["embedder", "random"], default="embedder")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, help="keep the data and runs here (default: a temp folder)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="vembed-rerank-"))
    rows = []
    for name in args.sets:
        for seed in args.seeds:
            root = work / f"{name}-seed{seed}"
            files = (make_digits if name == "digits" else make_photos)(root / "data", seed)
            model = build_model(root / "model", seed)
            start = time.perf_counter()
            embedder = train_embedder(
                files, model, root / "embedder", loss=args.loss, seed=seed, epochs=args.epochs
            )
            backbone = model if args.pairwise_backbone == "random" else None
            result = train_reranker(files, embedder, root / f"rerank-{args.pairwise_backbone}", backbone=backbone,
                                    args=args, seed=seed)  # fmt: skip
            val = json.loads((result.final_dir / "vembed.json").read_text())["training"]["rerank"]
            row = {
                "set": name, "seed": seed, "val": val["validation"], "train_pairs": val["train_pairs"],
                "test": test_recalls(embedder, result.final_dir, files["test"], args.top_n),
                "seconds": round(time.perf_counter() - start, 1),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    table = _table(rows, args)
    print(table)
    if args.json:
        write_json(args.json, {"argv": sys.argv[1:], "rows": rows, "table": table})
    return 0


def _table(rows: list[dict], args) -> str:
    lines = [
        f"embedder: {args.loss}, {args.epochs} epochs; re-ranker: top {args.top_n}, {args.rerank_epochs} "
        f"epochs, lr {args.lr}, pairwise backbone: {args.pairwise_backbone}",
        "| set | seed | val R@1 embedding | val R@1 re-ranked (w) | val pair acc. | test R@1 embedding "
        "| test R@1 calibrated | test w=0.5 | test w=1 (pairwise only) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v, t = r["val"], r["test"]
        lines.append(
            f"| {r['set']} | {r['seed']} | {100 * v['embedding_recall@1']:.1f} | {100 * v['recall@1']:.1f} "
            f"({v['blend_weight']:g}) | {100 * v['pair_accuracy']:.1f} | {100 * t['embedding']:.1f} | "
            f"{100 * t['w=calibrated']:.1f} | {100 * t['w=0.5']:.1f} | {100 * t['w=1.0']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
