"""Segmentation end to end on a synthetic shapes set: mIoU before and after training a tiny model.

    python bench/bench_segmentation.py                 # defaults below, CPU, a few minutes on 2 cores
    python bench/bench_segmentation.py --epochs 30 --images 240 --json seg.json

The same path as ``vembed prepare segfolder`` → ``vembed train`` (train.task=segmentation) →
``vembed eval segmentation --corruptions``: squares and discs on a noisy background
(:mod:`vembed.data.shapes`, 56 px, 3 classes, 255 outlines), a seeded 70/15/15 split, a DINOv2-shaped
encoder (4 layers, width 64, patch 14, **random initialisation**: no weights can be downloaded
offline) trained fully with the ``linear`` decoder, best model by validation mIoU. "before" is that
untrained model (random encoder and decoder); both are scored on the held-out test split, clean and
under every corruption at severity 5.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vembed.data.prepare import prepare_segfolder
from vembed.data.records import read_records
from vembed.data.shapes import write_shapes
from vembed.evaluation.compare import compare
from vembed.io import write_json
from vembed.models.factory import save_model
from vembed.models.segmenter import create_segmenter
from vembed.settings import load_settings
from vembed.tasks.segmentation.corruptions import CORRUPTIONS
from vembed.tasks.segmentation.evaluator import SegEvalOptions, SegmentationEvaluator
from vembed.tasks.segmentation.report import segmentation_report
from vembed.training import train


def tiny_encoder(path: Path, size: int) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Dinov2Config(
        image_size=size,
        patch_size=14,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        mlp_ratio=2,
    )
    tf.Dinov2Model(config).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--decoder", default="linear", choices=["linear", "fpn"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="Keep everything here (default: a temp dir)."
    )
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        write_shapes(root / "shapes", count=args.images, size=args.size, seed=0)
        prepare_segfolder(root / "shapes", root / "data", val_ratio=0.15, test_ratio=0.15, seed=0)
        encoder = tiny_encoder(root / "encoder", args.size)
        overrides = [
            f"model.name={encoder}",
            f"model.image_size={args.size}",
            f"model.decoder={args.decoder}",
            f"data.train={root / 'data' / 'train.jsonl'}",
            f"data.val={root / 'data' / 'val.jsonl'}",
            "data.num_workers=0",
            "train.task=segmentation",
            "train.method=full",
            f"train.output_dir={root / 'run'}",
            f"train.epochs={args.epochs}",
            "train.batch_size=8",
            "train.lr=1e-3",
            "train.head_lr=1e-2",
        ]
        settings = load_settings(None, overrides)
        test = read_records(root / "data" / "test.jsonl").masks()
        names = ["background", "square", "disc"]
        before_model = create_segmenter(encoder, settings.model, num_classes=3, class_names=names)
        save_model(before_model, root / "before", head=before_model.head())
        start = time.perf_counter()
        result = train(settings, show_progress=False)
        seconds = time.perf_counter() - start
        options = SegEvalOptions(
            batch_size=settings.eval.batch_size,
            num_workers=settings.data.num_workers,
            corruptions=tuple(CORRUPTIONS),
            severities=(5,),
        )
        compared = compare(
            [root / "before", result.final_dir],
            SegmentationEvaluator(test, options),
            load=create_segmenter,
            show_progress=False,
        )
        rows = {}
        for label, scored in zip(("before", "after"), compared.scored, strict=True):
            report = segmentation_report(scored, data="test.jsonl")
            rows[label] = {  # fractions, like every vembed metric
                "miou": round(report.metrics.miou, 4),
                "pixel_accuracy": round(report.metrics.pixel_accuracy, 4),
                "miou_c5": round(report.to_json()["corruptions_mean"]["5"], 4),
            }
        out = {
            "images": {"train": args.images - 2 * round(args.images * 0.15), "test": len(test)},
            "epochs": args.epochs,
            "steps": result.steps,
            "decoder": args.decoder,
            "train_seconds": round(seconds, 1),
            "selected_step": result.best["step"] if result.best else None,
            **rows,
        }
        print(json.dumps(out, indent=2))
        if args.json:
            write_json(args.json, out)


if __name__ == "__main__":
    main()
