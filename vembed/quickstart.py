"""``vembed quickstart``: the whole pipeline, offline, on a small real image data set, in minutes on a CPU.

1. **prepare** — scikit-learn's bundled handwritten digits (1,797 real 8×8 scans of 10 digits, installed
   with scikit-learn, no download) are written as 32×32 PNGs into an ImageFolder tree and split into
   stratified train / val / test JSONL by ``vembed prepare imagefolder``'s own code;
2. **model** — a small ViT (DINOv2 architecture) built from a config with random weights and saved like
   a hub checkpoint (a fresh machine cannot download pretrained weights);
3. **before** — Recall@K / MAP@R of that model on the held-out test split (all-vs-all);
4. **train** — the real training loop (:func:`vembed.training.train`): full fine-tuning, InfoNCE over
   P×K class-balanced batches, validation each epoch, the best checkpoint kept, ``final/`` written;
5. **after** — the same evaluation of ``final/``, a before/after table and ``quickstart.json``.

Real recipes differ in what matters for quality, not in the code path: pretrained hub weights
(``dinov2-base``), LoRA, 224 px photos and tens of thousands of images (see ``recipes/``).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vembed.console import log
from vembed.errors import VembedError
from vembed.evaluation.options import retrieval_setup
from vembed.evaluation.run import RetrievalReport, evaluate_retrieval
from vembed.io import atomic_dir, write_json, write_text
from vembed.settings import Settings, load_settings

MARKER = ".vembed-quickstart"
SUMMARY = "quickstart.json"
# patch-token mean learns faster than CLS from random weights
QUICKSTART_POOLING = "mean"
OWNED = ("images", "data", "model", "run", SUMMARY)  # what a re-run replaces inside --out


@dataclass
class QuickstartOptions:
    """Sizes of the demonstration (the defaults take a few minutes on 2 CPU cores)."""

    epochs: int = 12
    images_per_class: int | None = None  # None: all (~180 per digit)
    image_px: int = 32  # the 8×8 scans are upscaled to this size (bicubic)
    val_ratio: float = 0.15
    test_ratio: float = 0.25
    # the ViT: 32 px input, 8 px patches → 16 tokens + CLS
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    # training
    loss: str = "infonce"
    batch_size: int = 80
    samples_per_class: int | None = None  # None: P×K adapts to the 10 digits (10 classes × 8 images)
    # digits: no flips (a mirrored 2 is not a 2) and no crops (the whole image is the digit)
    augment: bool | dict | None = None  # None: the default (no augmentation)
    lr: float = 1e-3
    seed: int = 0
    num_workers: int = 0  # tiny PNGs decode faster in-process than through worker processes
    show_progress: bool = True


@dataclass
class QuickstartResult:
    out: Path
    data_dir: Path
    model_dir: Path
    run_dir: Path
    final_dir: Path
    before: RetrievalReport
    after: RetrievalReport
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def summary_path(self) -> Path:
        return self.out / SUMMARY

    @property
    def title(self) -> str:
        n = int(self.after.metrics.get("num_queries", 0))
        return f"quickstart: digits test split, {n} images, all-vs-all"


def run_quickstart(
    out: str | Path = "runs/quickstart", options: QuickstartOptions | None = None
) -> QuickstartResult:
    """Prepare the digits, build a small ViT, evaluate, train, evaluate again; see the module docstring."""
    from vembed.data.prepare import prepare_imagefolder
    from vembed.training import train

    options = options or QuickstartOptions()
    start = time.perf_counter()
    out = Path(out)
    _claim(out)

    log("[bold]1/5 prepare[/]: scikit-learn's handwritten digits → PNG class folders → JSONL splits")
    images = write_digits(out / "images", images_per_class=options.images_per_class, px=options.image_px)
    prepared = prepare_imagefolder(
        images, out / "data", seed=options.seed, val_ratio=options.val_ratio, test_ratio=options.test_ratio
    )
    missing = [s for s in ("train", "val", "test") if s not in prepared.files]
    if missing:
        raise VembedError(
            f"quickstart: too few images per class for a {', '.join(missing)} split; raise --images-per-class"
        )

    log("[bold]2/5 model[/]: a small ViT (DINOv2 architecture) with random weights, built from a config")
    model_dir = build_model(out / "model", options)
    settings = quickstart_settings(out, model_dir, prepared.files, options)

    log("[bold]3/5 before[/]: retrieval on the test split with the untrained model")
    before = evaluate_retrieval(
        str(model_dir),
        prepared.files["test"],
        **retrieval_setup(settings),
        show_progress=options.show_progress,
    )
    before.model = "random init"

    log(f"[bold]4/5 train[/]: full fine-tuning, {options.loss}, P×K batches, {options.epochs} epochs")
    trained = train(settings, show_progress=options.show_progress)

    log("[bold]5/5 after[/]: the same evaluation of the trained model")
    after = evaluate_retrieval(
        str(trained.final_dir),
        prepared.files["test"],
        **retrieval_setup(settings),
        show_progress=options.show_progress,
    )
    after.model = "trained"

    seconds = time.perf_counter() - start
    summary = {
        "what": "vembed quickstart: scikit-learn digits, random-init ViT, full fine-tuning; test split all-vs-all",
        "data": {name: str(path) for name, path in prepared.files.items()},
        "split_sizes": {
            name: stats.get("images") for name, stats in prepared.summary.get("splits", {}).items()
        },
        "model": str(model_dir),
        "final": str(trained.final_dir),
        "options": {k: v for k, v in asdict(options).items() if k != "show_progress"},
        "before": before.to_json(),
        "after": after.to_json(),
        "train": {
            "steps": trained.steps,
            "seconds": round(trained.seconds, 2),
            "images_per_second": round(trained.images_per_second, 1),
            "selected": trained.selected,
            "best_validation": trained.best,
        },
        "seconds": round(seconds, 2),
    }
    write_json(out / SUMMARY, summary)
    return QuickstartResult(
        out=out,
        data_dir=out / "data",
        model_dir=model_dir,
        run_dir=trained.run_dir,
        final_dir=trained.final_dir,
        before=before,
        after=after,
        summary=summary,
        seconds=seconds,
    )


def write_digits(folder: Path, *, images_per_class: int | None = None, px: int = 32) -> Path:
    """scikit-learn's digits as ``folder/<digit>/<index>.png`` (grey, upscaled to ``px``), written atomically.

    ``images_per_class`` keeps the first that many of each digit (in the data set's order).
    """
    from sklearn.datasets import load_digits

    if images_per_class is not None and images_per_class < 3:
        raise VembedError(
            f"--images-per-class must be at least 3 (train, val and test), got {images_per_class}"
        )
    digits = load_digits()
    kept: dict[int, int] = {}
    with atomic_dir(folder) as tmp:
        for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            label = int(label)
            if images_per_class is not None and kept.get(label, 0) >= images_per_class:
                continue
            kept[label] = kept.get(label, 0) + 1
            grey = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)  # values 0..16 → 0..255
            image = Image.fromarray(grey, "L").resize((px, px), Image.Resampling.BICUBIC)
            target = tmp / str(label) / f"{index:04d}.png"
            target.parent.mkdir(exist_ok=True)
            image.save(target)
    log(f"wrote {sum(kept.values()):,} digit images ({len(kept)} classes) to {folder}")
    return folder


def build_model(folder: Path, options: QuickstartOptions) -> Path:
    """A randomly initialised DINOv2-architecture ViT sized by ``options``, saved with ``save_pretrained``
    plus the ``vembed.json`` that names its pooling (mean)."""
    import transformers

    from vembed.models.factory import load_embedder, save_model

    config = transformers.Dinov2Config(
        image_size=options.image_px,
        patch_size=options.patch_size,
        hidden_size=options.hidden_size,
        num_hidden_layers=options.num_layers,
        num_attention_heads=options.num_heads,
        mlp_ratio=4,
    )
    torch.manual_seed(options.seed)
    model = transformers.Dinov2Model(config)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        # vembed.json: the folder carries the quickstart's pooling, so `--model runs/quickstart/model`
        # anywhere measures what the quickstart's "before" row measured
        embedder = load_embedder(tmp, pooling=QUICKSTART_POOLING, device="cpu", dtype="float32")
        save_model(embedder, tmp, extra={"base_model": f"random init ({folder})"})
    params = sum(p.numel() for p in model.parameters())
    log(
        f"model: {options.num_layers} layers, width {options.hidden_size}, {params / 1e3:.0f}k parameters → {folder}"
    )
    return folder


def quickstart_settings(
    out: Path, model_dir: Path, files: dict[str, Path], options: QuickstartOptions
) -> Settings:
    """The run's settings, validated like any recipe (``RUN/settings.yaml`` records them)."""
    return load_settings(
        None,
        values={
            "model.name": str(model_dir),
            "model.pooling": QUICKSTART_POOLING,
            "data.train": str(files["train"]),
            "data.val": str(files["val"]),
            "data.test": str(files["test"]),
            "data.num_workers": options.num_workers,
            "train.output_dir": str(out / "run"),
            "train.method": "full",
            "train.loss": options.loss,
            "train.epochs": options.epochs,
            "train.batch_size": options.batch_size,
            "train.samples_per_class": options.samples_per_class,
            "train.lr": options.lr,
            "train.warmup_ratio": 0.1,
            **({} if options.augment is None else {"train.augment": options.augment}),
            "train.seed": options.seed,
            "eval.k": [1, 10],
            "eval.batch_size": 256,
        },
    )


def _claim(out: Path) -> None:
    """Use ``out`` (new, empty, or an earlier quickstart's, whose outputs are replaced); never anything else."""
    if out.is_file():
        raise VembedError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise VembedError(
            f"--out {out} exists and was not written by vembed quickstart; choose another folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    write_text(out / MARKER, "written by vembed quickstart; a re-run replaces its outputs here\n")
