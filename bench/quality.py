"""Which model should a run keep? Test Recall@1 of the model each selection rule picks, on two real small sets.

    python bench/quality.py                          # both sets, infonce + supcon, 1 seed, 15 epochs
    python bench/quality.py --sets photos --losses infonce --seeds 0 1 2 --epochs 15 --json out.json
    python bench/quality.py --tables a.json b.json     # one table (means over seeds) of earlier runs
    python bench/quality.py --sets photos --losses triplet --hard-negatives 0 2   # without / with mined negatives

Two real, offline data sets (no download):

- ``digits``: scikit-learn's 1,797 handwritten digits (10 classes) as 32 px PNGs, split like the
  quickstart (60 % train = 1,078 images, 15 % val, 25 % test; the same 10 classes in every split);
- ``photos``: scikit-image's 24 bundled sample photos; each photo's four quadrants are four classes, and
  the images of a class are random crops (10-50 % of the quadrant's area, aspect 3/4-4/3) at 40 px with
  brightness and contrast jittered by up to 30 %. Classes are split whole: 48 training classes x 21
  images (1,008), 8 validation classes x 18 images (144), the other 40 classes for test (unseen in
  training, 12 images each: 480).

On each set a small random-init ViT (the quickstart's: DINOv2 architecture, 32 px, 4 layers, width 64,
mean pooling) is fully fine-tuned (batch 64, lr 3e-4, ``--epochs``, validation at each epoch end, a
checkpoint at each epoch end kept). Every checkpoint is then evaluated on the test split, so one run
answers for every rule: before training, the last step, the best validation Recall@1 / MAP@R, and the same
with the metric smoothed over 3 validations (``train.select_smoothing=3``). The oracle row (best test
Recall@1 of any validated step) bounds what selection can gain.

``--hard-negatives 0 2`` runs every loss twice: as it is (0), and on the training records mined with the
untrained model (``vembed mine``'s library call: 8 negatives per image, margin 0.05 or ``--mine-margin``) with
``train.hard_negatives=2``; ``--remine N`` adds ``train.remine_every=N`` to the mined runs.
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
from PIL import Image

from vembed.evaluation.retrieval import retrieval_metrics
from vembed.extras import require
from vembed.inference import embed_records
from vembed.io import write_json
from vembed.settings import load_settings
from vembed.training import checkpoint as ckpt
from vembed.training.selection import Selection

# skimage.data photos bundled with the package (no pooch download); "cat" is chelsea again.
PHOTOS = (
    "astronaut", "binary_blobs", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon",
    "page", "retina", "rocket", "shepp_logan_phantom", "text", "stereo_motorcycle", "checkerboard",
)  # fmt: skip
RULES = {
    "best recall@1": Selection("recall@1", smoothing=1),
    "best map@r": Selection("map@r", smoothing=1),
    "best recall@1, smoothed 3": Selection("recall@1", smoothing=3),
    "best map@r, smoothed 3": Selection("map@r", smoothing=3),
    "last step": Selection("map@r", mode="last"),
}


def make_digits(root: Path, seed: int) -> dict[str, Path]:
    from vembed.data.prepare import prepare_imagefolder
    from vembed.quickstart import write_digits

    images = write_digits(root / "images", px=32)
    prepared = prepare_imagefolder(images, root / "data", seed=seed, val_ratio=0.15, test_ratio=0.25)
    return {split: prepared.files[split] for split in ("train", "val", "test")}


def make_photos(root: Path, seed: int, *, px: int = 40) -> dict[str, Path]:
    skimage_data = require("skimage.data", "bench", what="bench/quality.py's photos set")
    rng = random.Random(seed)
    classes = []
    for name in PHOTOS:
        # binary_blobs is drawn at random: seeded, so that every invocation cuts the same photos
        array = skimage_data.binary_blobs(rng=0) if name == "binary_blobs" else getattr(skimage_data, name)()
        if isinstance(array, tuple):
            array = array[0]
        array = np.asarray(array)
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        image = Image.fromarray(array.astype(np.uint8)).convert("RGB")
        w, h = image.size
        for row in range(2):
            for col in range(2):
                box = (col * w // 2, row * h // 2, (col + 1) * w // 2, (row + 1) * h // 2)
                classes.append((f"{name}-{row}{col}", image.crop(box)))
    rng.shuffle(classes)
    splits = {"train": (classes[:48], 21), "val": (classes[48:56], 18), "test": (classes[56:], 12)}
    files = {}
    for split, (members, count) in splits.items():
        lines = []
        for label, image in members:
            folder = root / "images" / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                path = folder / f"{i:03d}.png"
                _random_crop(image, rng, px).save(path)
                lines.append(json.dumps({"image": str(path), "label": label}))
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("\n".join(lines) + "\n")
    return files


def _random_crop(image: Image.Image, rng: random.Random, px: int) -> Image.Image:
    """A random crop (10-50 % of the area) at ``px``, with brightness and contrast jittered by up to 30 %."""
    from PIL import ImageEnhance

    crop = _crop(image, rng, px)
    crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Contrast(crop).enhance(rng.uniform(0.7, 1.3))


def _crop(image: Image.Image, rng: random.Random, px: int) -> Image.Image:
    w, h = image.size
    for _ in range(20):
        area = w * h * rng.uniform(0.1, 0.5)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if cw <= w and ch <= h:
            break
    else:
        cw = ch = min(w, h)
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return image.resize((px, px), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))


def mine(files: dict[str, Path], model: Path, margin: float = 0.05) -> Path:
    """The training records with ``negatives`` mined by the untrained model (its mean pooling)."""
    from vembed.inference import EmbedOptions
    from vembed.mining import mine_file
    from vembed.models.factory import create_embedder

    options = load_settings(None, ["model.pooling=mean", "model.device=cpu"]).model
    out = files["train"].parent / "train-mined.jsonl"
    summary = mine_file(
        lambda: create_embedder(str(model), options),
        files["train"],
        out,
        k=8,
        margin=margin,
        options=EmbedOptions(batch_size=256, num_workers=0, show_progress=False),
    )
    print(f"mined: {summary}", file=sys.stderr)
    return out


def build_model(folder: Path, seed: int) -> Path:
    from vembed.quickstart import QuickstartOptions
    from vembed.quickstart import build_model as quickstart_model

    return quickstart_model(folder, QuickstartOptions(seed=seed, show_progress=False))


def train_and_test(
    files: dict[str, Path], model: Path, out: Path, *, loss: str, seed: int, epochs: int, extra: list[str]
):
    """One training run (every epoch validated and checkpointed); test Recall@1 at every validated step."""
    from vembed.training import train

    settings = load_settings(
        None,
        [
            f"model.name={model}",
            "model.pooling=mean",
            f"data.train={files['train']}",
            f"data.val={files['val']}",
            "data.num_workers=0",
            f"train.output_dir={out}",
            "train.method=full",
            f"train.loss={loss}",
            "train.batch_size=64",
            "train.lr=3e-4",
            f"train.epochs={epochs}",
            f"train.seed={seed}",
            "train.keep_checkpoints=1000",
            "eval.k=1,10",
            "eval.batch_size=256",
            *extra,
        ],
    )
    start = time.perf_counter()
    result = train(settings, show_progress=False)
    seconds = time.perf_counter() - start
    test = _test_recall(settings, files["test"], model, out)
    history = [{**row, "test_recall@1": test[row["step"]]} for row in result.history if row["step"] in test]
    return history, seconds


def _test_recall(settings, test_file: Path, model: Path, run_dir: Path) -> dict[int, float]:
    """Test Recall@1 of the untrained model (step 0) and of every checkpoint of the run."""
    import torch

    from vembed.data.records import read_records
    from vembed.models.factory import create_embedder

    records = read_records(test_file).images()
    labels = [r.label for r in records]
    embedder = create_embedder(str(model), settings.model.model_copy(update={"device": "cpu"}))
    states = {0: None} | {int(p.name.split("-")[1]): p for p in ckpt.list_checkpoints(run_dir)}
    out = {}
    for step, path in states.items():
        if path is not None:
            weights = {k: v for k, v in ckpt.load_model_state(path).items() if not k.startswith("loss.")}
            missing = set(dict(embedder.named_parameters())) - set(weights)
            assert not missing, f"{path}: not a full fine-tuning checkpoint ({sorted(missing)[:3]})"
            embedder.load_state_dict(weights, strict=False)
        with torch.inference_mode():
            found = embed_records(embedder, records, batch_size=256, num_workers=0, show_progress=False)
        out[step] = float(retrieval_metrics(found.embeddings, labels, ks=(1,))["recall@1"])
    return out


def select(history: list[dict]) -> dict[str, dict]:
    """The row each rule keeps, plus 'before training' and the oracle."""
    chosen = {"before training": history[0]}
    chosen.update({name: rule.choose(history) for name, rule in RULES.items()})
    chosen["oracle (best test)"] = max(history[1:], key=lambda row: row["test_recall@1"])
    return chosen


def _picks(history: list[dict]) -> dict[str, dict]:
    return {
        rule: {"step": r["step"], "test_recall@1": r["test_recall@1"]} for rule, r in select(history).items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["digits", "photos"], choices=["digits", "photos"])
    parser.add_argument("--losses", nargs="+", default=["infonce", "supcon"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value settings for every run")
    parser.add_argument(
        "--hard-negatives",
        nargs="+",
        type=int,
        default=[0],
        help="train.hard_negatives values to run each loss with (0: off; >0: on records mined by the untrained model)",
    )
    parser.add_argument("--remine", type=int, help="train.remine_every for the hard-negative runs")
    parser.add_argument(
        "--mine-margin", type=float, default=0.05, help="the miner's false-negative guard margin (inf: off)"
    )
    parser.add_argument("--json", type=Path, help="write every run's history and the table here")
    parser.add_argument("--work", type=Path, help="keep the data and runs here (default: a temp folder)")
    parser.add_argument("--tables", nargs="+", type=Path, help="only print the table of these --json files")
    args = parser.parse_args(argv)
    if args.tables:
        runs = [run for path in args.tables for run in json.loads(path.read_text())["runs"]]
        for run in runs:  # the rules as this code applies them
            run["picks"] = _picks(run["history"])
        print(_table(runs))
        return 0

    import torch

    torch.set_num_threads(1)  # 2 loaded cores: one intra-op thread is faster for this tiny model
    work = args.work or Path(tempfile.mkdtemp(prefix="vembed-quality-"))
    runs = []
    for name in args.sets:
        for seed in args.seeds:
            root = work / f"{name}-seed{seed}"
            files = (make_digits if name == "digits" else make_photos)(root / "data", seed)
            model = build_model(root / "model", seed)
            for loss in args.losses:
                for hard in args.hard_negatives:
                    name_of_run, extra, run_files = loss, list(args.extra), files
                    if hard:
                        run_files = {**files, "train": mine(files, model, args.mine_margin)}
                        extra.append(f"train.hard_negatives={hard}")
                        name_of_run += f" +hard{hard}" + (
                            "" if args.mine_margin == 0.05 else f" margin{args.mine_margin}"
                        )
                        if args.remine:
                            extra.append(f"train.remine_every={args.remine}")
                            name_of_run += f" remine{args.remine}"
                    history, seconds = train_and_test(
                        run_files,
                        model,
                        root / f"run-{name_of_run.replace(' ', '_')}",
                        loss=loss,
                        seed=seed,
                        epochs=args.epochs,
                        extra=extra,
                    )
                    runs.append(
                        {
                            "set": name,
                            "loss": name_of_run,
                            "seed": seed,
                            "seconds": seconds,
                            "history": history,
                        }
                    )
                    runs[-1]["picks"] = _picks(history)
                    queries = history[0].get("num_queries")
                    print(
                        f"{name} {name_of_run} seed {seed}: {seconds:.0f} s, {queries} validation queries",
                        file=sys.stderr,
                    )
    table = _table(runs)
    print(table)
    if args.json:
        write_json(args.json, {"argv": sys.argv[1:], "runs": runs, "table": table})
    return 0


def _table(runs: list[dict]) -> str:
    columns = sorted({(r["set"], r["loss"]) for r in runs})
    rules = list(runs[0]["picks"])
    lines = [
        "mean test Recall@1 (runs where the rule's model is at least as good as the last step's; steps picked)",
        "",
        "| rule | " + " | ".join(f"{s} {loss}" for s, loss in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for rule in rules:
        cells = []
        for column in columns:
            picks = [r["picks"][rule] for r in runs if (r["set"], r["loss"]) == column]
            mean = sum(p["test_recall@1"] for p in picks) / len(picks)
            steps = "/".join(str(p["step"]) for p in picks)
            wins = sum(
                p["test_recall@1"] >= r["picks"]["last step"]["test_recall@1"]
                for p, r in zip(picks, [r for r in runs if (r["set"], r["loss"]) == column], strict=True)
            )
            cells.append(f"{mean:.3f} ({wins}/{len(picks)}; steps {steps})")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
