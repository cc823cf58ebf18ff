"""``vembed prepare``: public data sets and your own files → validated JSONL splits + summary.json."""

from __future__ import annotations

from pathlib import Path

import typer

from vembed.cli.app import app
from vembed.console import console, log
from vembed.data.prepare import (
    PrepareResult,
    prepare_ade20k,
    prepare_csv,
    prepare_flowers102,
    prepare_imagefolder,
    prepare_jsonl,
    prepare_segfolder,
    prepare_sop,
    prepare_voc,
)
from vembed.data.prepare.summary import problem_lines
from vembed.data.prepare.validate import CheckOptions

prepare_app = typer.Typer(
    help="Turn a public data set or your own files into validated, seeded JSONL splits "
    "(train/val/test.jsonl + summary.json) that `vembed train` and `vembed eval` read directly.",
    no_args_is_help=True,
)
app.add_typer(prepare_app, name="prepare")

SEED = typer.Option(0, "--seed", help="Seed of every random choice: the same seed gives identical files.")
CHECK = typer.Option(
    False,
    "--check-images",
    help="Decode every image (in parallel) and list the bad ones; default: existence only.",
)
WORKERS = typer.Option(None, "--workers", min=1, help="Threads for --check-images (default: CPUs + 4).")
SKIP_BAD = typer.Option(
    False, "--skip-bad", help="Leave out bad records/images (listed in problems.txt) instead of stopping."
)
VAL = typer.Option(0.1, "--val-ratio", help="Share of each class's images in val (0: no val split).")
TEST = typer.Option(0.1, "--test-ratio", help="Share of each class's images in test (0: no test split).")
SHOTS = typer.Option(0, "--shots", min=0, help="Also write k-shot support/query files with this many shots.")
RESIZE = typer.Option(
    None,
    "--resize-to",
    min=32,
    help="Also write copies whose shorter side is N px to OUT/resized-N/ (records gain 'resized', keep "
    "'image' as the original): less decoding every epoch. N: at least the training decode size (320 for "
    "224 px models at the default crops).",
)
HOLDOUT = typer.Option(
    0.0, "--holdout-classes", help="Share of the classes held out entirely (unseen.jsonl)."
)


@prepare_app.command("sop")
def sop_command(
    root: Path = typer.Option(
        None, "--root", help="Extracted Stanford_Online_Products (with Ebay_train.txt). Default: kagglehub."
    ),
    out: Path = typer.Option(Path("data/sop"), "--out", "-o", help="Output folder."),
    val_classes: float = typer.Option(
        0.1, "--val-classes", help="Share of the training products held out (whole) as val.jsonl."
    ),
    seed: int = SEED,
    check_images: bool = CHECK,
    workers: int = WORKERS,
    skip_bad: bool = SKIP_BAD,
    resize_to: int = RESIZE,
) -> None:
    """Stanford Online Products: train/val from the official train split, test = the official test split."""
    result = prepare_sop(
        root,
        out,
        seed=seed,
        val_classes_ratio=val_classes,
        check=CheckOptions(check_images, workers, skip_bad),
    )
    finish(result, resize_to, workers)


@prepare_app.command("flowers102")
def flowers_command(
    root: Path = typer.Option(
        None, "--root", help="Local copy with imagelabels.mat, setid.mat and jpg/ (or 102flowers.tgz)."
    ),
    kaggle: str = typer.Option(
        None, "--kaggle", help="A Kaggle mirror (OWNER/NAME) holding the official files."
    ),
    out: Path = typer.Option(Path("data/flowers102"), "--out", "-o", help="Output folder."),
    holdout_ratio: float = typer.Option(
        0.2, "--holdout-ratio", help="Share of the classes held out entirely (unseen.jsonl)."
    ),
    val_ratio: float = VAL,
    test_ratio: float = typer.Option(0.3, "--test-ratio", help="Share of each seen class's images in test."),
    official_split: bool = typer.Option(
        False, "--official-split", help="Split the seen classes by setid.mat instead of by ratio."
    ),
    shots: int = typer.Option(
        10, "--shots", min=0, help="Support images per class in *_support.jsonl (0: none)."
    ),
    seed: int = SEED,
    check_images: bool = CHECK,
    workers: int = WORKERS,
    skip_bad: bool = SKIP_BAD,
    resize_to: int = RESIZE,
) -> None:
    """Oxford Flowers-102: seen train/val/test, unseen classes, k-shot support/query files."""
    result = prepare_flowers102(
        root,
        out,
        kaggle=kaggle,
        seed=seed,
        holdout_ratio=holdout_ratio,
        val_ratio=val_ratio,
        test_ratio=test_ratio,
        official_split=official_split,
        shots=shots,
        check=CheckOptions(check_images, workers, skip_bad),
    )
    finish(result, resize_to, workers)


@prepare_app.command("imagefolder")
def imagefolder_command(
    folder: Path = typer.Argument(
        None, help="A class_name/image tree (with --kaggle: a folder inside the download, optional)."
    ),
    kaggle: str = typer.Option(None, "--kaggle", help="Download this Kaggle data set (OWNER/NAME) first."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: data/<folder name>)."),
    val_ratio: float = VAL,
    test_ratio: float = TEST,
    holdout_classes: float = HOLDOUT,
    shots: int = SHOTS,
    seed: int = SEED,
    check_images: bool = CHECK,
    workers: int = WORKERS,
    skip_bad: bool = SKIP_BAD,
    resize_to: int = RESIZE,
) -> None:
    """Any ImageFolder tree: stratified split by ratio, or its train/ val/ test/ folders kept."""
    name = kaggle.rstrip("/").split("/")[-1] if kaggle else (folder.absolute().name if folder else "")
    result = prepare_imagefolder(
        folder,
        out or Path("data") / (name or "imagefolder"),
        kaggle=kaggle,
        seed=seed,
        val_ratio=val_ratio,
        test_ratio=test_ratio,
        holdout_ratio=holdout_classes,
        shots=shots,
        check=CheckOptions(check_images, workers, skip_bad),
    )
    finish(result, resize_to, workers)


def _table_command(fmt: str):
    def command(
        file: Path = typer.Argument(..., help=f"Your records ({fmt.upper()})."),
        out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: data/<file name>)."),
        image_key: str = typer.Option("image", "--image-key", help="Field with the image path."),
        label_key: str = typer.Option("label", "--label-key", help="Field with the class label."),
        category_key: str = typer.Option("category", "--category-key", help="Field with a super-category."),
        split_key: str = typer.Option(
            "split", "--split-key", help="Field with train/val/test; respected when present."
        ),
        image_root: Path = typer.Option(
            None, "--image-root", help="Resolve relative image paths here (default: the file's folder)."
        ),
        delimiter: str = typer.Option(None, "--delimiter", help="CSV delimiter (default: sniffed)."),
        text_key: str = typer.Option(
            None,
            "--text-key",
            help="Field with a caption: write captioned images ({image, captions}, rows of one image "
            "merged) for train.task=image_text instead of labelled ones.",
        ),
        val_ratio: float = VAL,
        test_ratio: float = TEST,
        holdout_classes: float = HOLDOUT,
        shots: int = SHOTS,
        seed: int = SEED,
        check_images: bool = CHECK,
        workers: int = WORKERS,
        skip_bad: bool = SKIP_BAD,
        resize_to: int = RESIZE,
    ) -> None:
        options = dict(
            image_key=image_key,
            label_key=label_key,
            category_key=category_key,
            split_key=split_key,
            image_root=image_root,
            seed=seed,
            val_ratio=val_ratio,
            test_ratio=test_ratio,
            holdout_ratio=holdout_classes,
            shots=shots,
            check=CheckOptions(check_images, workers, skip_bad),
        )
        out = out or Path("data") / file.stem
        if text_key is not None:
            from vembed.data.prepare.captions import prepare_caption_table

            render_captions(
                prepare_caption_table(
                    file, out, fmt=fmt, image_key=image_key, text_key=text_key, split_key=split_key,
                    image_root=image_root, delimiter=delimiter, val_ratio=val_ratio, test_ratio=test_ratio,
                    seed=seed, skip_bad=skip_bad,
                )
            )  # fmt: skip
            return
        if fmt == "csv":
            result = prepare_csv(file, out, delimiter=delimiter, **options)
        else:
            if delimiter is not None:
                log("[yellow]note:[/] --delimiter applies to CSV files only")
            result = prepare_jsonl(file, out, **options)
        finish(result, resize_to, workers)

    command.__doc__ = (
        f"Your own {fmt.upper()} records: validate each line, map field names, split as imagefolder does."
    )
    return command


prepare_app.command("jsonl")(_table_command("jsonl"))
prepare_app.command("csv")(_table_command("csv"))


@prepare_app.command("flickr30k")
def flickr30k_command(
    root: Path = typer.Option(
        None,
        "--root",
        help="Folder with the Flickr30k images (and dataset_flickr30k.json). Default: kagglehub.",
    ),
    splits: Path = typer.Option(None, "--splits", help="The Karpathy split file (dataset_flickr30k.json)."),
    out: Path = typer.Option(Path("data/flickr30k"), "--out", "-o", help="Output folder."),
    skip_bad: bool = SKIP_BAD,
) -> None:
    """Flickr30k captions, Karpathy splits (29,000 / 1,014 / 1,000 images, 5 captions each)."""
    from vembed.data.prepare.captions import prepare_flickr30k

    render_captions(prepare_flickr30k(root, out, splits_file=splits, skip_bad=skip_bad))


@prepare_app.command("coco-captions")
def coco_captions_command(
    root: Path = typer.Option(..., "--root", help="Folder with COCO 2014's train2014/ and val2014/ images."),
    splits: Path = typer.Option(None, "--splits", help="The Karpathy split file (dataset_coco.json)."),
    out: Path = typer.Option(Path("data/coco"), "--out", "-o", help="Output folder."),
    skip_bad: bool = SKIP_BAD,
) -> None:
    """COCO captions, Karpathy splits: train (with restval) / 5k val / the 5k test of the papers."""
    from vembed.data.prepare.captions import prepare_coco_captions

    render_captions(prepare_coco_captions(root, out, splits_file=splits, skip_bad=skip_bad))


def render_captions(result) -> None:
    from rich.table import Table

    table = Table(title=f"captioned images → {result.out}", title_justify="left")
    for column in ("split", "images", "captions", "file"):
        table.add_column(column, justify="left" if column in ("split", "file") else "right")
    for name, counts in result.counts.items():
        table.add_row(name, f"{counts['images']:,}", f"{counts['captions']:,}", str(result.files[name]))
    console.print(table)
    if result.problems:
        log(f"[yellow]left out {len(result.problems)} bad row(s)[/]; first: {result.problems[0]}")
    log(f"wrote {result.summary_path}")


@prepare_app.command("segfolder")
def segfolder_command(
    root: Path = typer.Argument(..., help="ROOT with images/NAME.{jpg,png} and masks/NAME.png."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: data/<root name>)."),
    val_ratio: float = typer.Option(
        0.1, "--val-ratio", help="Share of the images in val (without split files)."
    ),
    test_ratio: float = typer.Option(
        0.1, "--test-ratio", help="Share of the images in test (without split files)."
    ),
    seed: int = SEED,
    check_images: bool = CHECK,
    workers: int = WORKERS,
    skip_bad: bool = SKIP_BAD,
) -> None:
    """A segmentation set: images/ + masks/ (one channel, class indices, 255 = ignore), optional
    classes.txt and splits/{train,val,test}.txt; writes {"image", "mask"} records and classes.txt."""
    result = prepare_segfolder(
        root,
        out or Path("data") / root.absolute().name,
        seed=seed,
        val_ratio=val_ratio,
        test_ratio=test_ratio,
        check=CheckOptions(check_images, workers, skip_bad),
    )
    render(result)


def _segset_command(name: str, title: str, prepare):
    def command(
        root: Path = typer.Option(None, "--root", help="An extracted copy (default: the official archive)."),
        kaggle: str = typer.Option(
            None, "--kaggle", help="A Kaggle copy (OWNER/NAME), fetched with kagglehub."
        ),
        out: Path = typer.Option(Path("data") / name, "--out", "-o", help="Output folder."),
        seed: int = SEED,
        check_images: bool = CHECK,
        workers: int = WORKERS,
        skip_bad: bool = SKIP_BAD,
    ) -> None:
        result = prepare(
            root, out, kaggle=kaggle, seed=seed, check=CheckOptions(check_images, workers, skip_bad)
        )
        render(result)

    command.__doc__ = title
    return command


prepare_app.command("voc")(
    _segset_command(
        "voc",
        "Pascal VOC 2012 segmentation: official train/val, palette masks read as class indices (255 kept).",
        prepare_voc,
    )
)
prepare_app.command("ade20k")(
    _segset_command(
        "ade20k",
        "ADE20K (SceneParsing 2016): official train/val, 150 classes, 'other' (0) → 255 ignore.",
        prepare_ade20k,
    )
)


def finish(result: PrepareResult, resize_to: int | None, workers: int | None) -> None:
    """The optional resized-image cache (every source alike), then the summary."""
    if resize_to:
        from vembed.data.prepare.resize import resize_prepared

        result = resize_prepared(result, resize_to, workers=workers)
    render(result)


def render(result: PrepareResult) -> None:
    """The summary table and problems on stderr, then where the files are."""
    console.print(result.summary_table())
    for line in problem_lines(result.summary):
        console.print(line, style="yellow", highlight=False, markup=False)
    log(f"wrote {', '.join(result.summary['files'])} to [bold]{result.out}[/]")
