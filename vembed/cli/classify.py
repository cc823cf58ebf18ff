"""``vembed classify`` and ``vembed eval classify``: a model's classifier head (a ``ce`` run) at work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vembed.cli.app import app, quiet_transformers, settings_from
from vembed.cli.eval_classes import CONFIG_HELP, OVERRIDES_HELP, _write
from vembed.cli.evaluate import eval_app
from vembed.console import log

CLASSIFIER_HELP = "A model with a classifier head: a `train.loss=ce` run's final/ (or its export)."


@eval_app.command("classify")
def eval_classify_command(
    model: str = typer.Option(..., "--model", "-m", help=CLASSIFIER_HELP),
    data: Path = typer.Option(None, "--data", "-d", help="Labelled records (JSONL). Default: data.test."),
    json_out: Path = typer.Option(None, "--json", help="Write the results here as JSON."),
    plot: Path = typer.Option(None, "--plot", help="Save the confusion matrix as a PNG."),
    config: Path = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Top-1/top-5, per-class precision/recall/F1 and the confusion matrix of a classifier head."""
    from vembed.classify import load_classifier_model
    from vembed.cli.eval_classes import _records, _split
    from vembed.evaluation.base import read_eval_records
    from vembed.evaluation.classify import ClassifyEvaluator
    from vembed.evaluation.compare import compare
    from vembed.evaluation.options import embed_options

    settings = settings_from(config, overrides)
    data = _split(data, settings.data.test, "--data", "data.test")
    quiet_transformers()
    evaluator = ClassifyEvaluator(
        read_eval_records(data, **_records(settings)), embed=embed_options(settings)
    )
    load = lambda name: load_classifier_model(name, settings)  # noqa: E731
    result = compare([model], evaluator, load=load).first.report
    table = Table(title=f"{result.model} on {data}", title_justify="left", min_width=60)
    for column in ("class", "precision", "recall", "F1", "images"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for label, row in result.per_class.items():
        cells = [f"{100 * row[k]:.2f}" for k in ("precision", "recall", "f1")]
        table.add_row(label, *cells, str(row["support"]))
    table.caption = (
        f"top-1 {100 * result.top1:.2f} %  ·  top-5 {100 * result.top5:.2f} %  ·  {result.queries} images"
        + (f"  ·  {result.num_skipped} left out" if result.num_skipped else "")
    )
    Console().print(table)
    if plot is not None:
        from vembed.evaluation.plots import plot_confusion

        title = f"{Path(result.model).name or result.model}: top-1 {100 * result.top1:.1f} %"
        log(f"wrote {plot_confusion(result.labels, result.confusion, plot, title=title)}")
    _write(json_out, result.to_json(), settings)


@app.command("classify")
def classify_command(
    model: str = typer.Argument(..., help=CLASSIFIER_HELP),
    images: str = typer.Argument(
        ..., help="A folder (recursive), a .jsonl records file, an image, or - for image paths on stdin."
    ),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    jsonl: bool = typer.Option(
        False, "--jsonl", help='JSON lines on stdout: {"image", "label", "probability", "top": [...]}.'
    ),
    top: int = typer.Option(3, "--top", help="Classes shown per image, most probable first."),
    grid: Path = typer.Option(
        None, "--grid", help="Save a PNG of the images captioned with their predictions."
    ),
    skip_bad: bool = typer.Option(None, "--skip-bad", help="Skip undecodable images and count them."),
    config: Path = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Predict classes (label, probability) for images with a model's classifier head."""
    from vembed.classify import classify_images
    from vembed.index.sources import records_from_source

    settings = settings_from(config, overrides, data__skip_bad=skip_bad)
    records, problems = records_from_source(
        images, image_root=settings.data.image_root, skip_bad=settings.data.skip_bad
    )
    quiet_transformers()
    predictions, bad = classify_images(model, records, top=top, settings=settings, show_progress=not quiet)
    problems += bad
    if jsonl:
        for p in predictions:
            sys.stdout.write(json.dumps(p.to_json()) + "\n")
        sys.stdout.flush()
    else:
        table = Table(title=f"{len(predictions)} images classified by {model}", title_justify="left")
        table.add_column("image", overflow="fold")
        table.add_column("label")
        table.add_column("probability", justify="right")
        if top > 1:
            table.add_column("next most probable")
        for p in predictions:
            rest = ", ".join(
                f"{label} {100 * q:.1f}%" for label, q in zip(p.labels[1:], p.probabilities[1:], strict=True)
            )
            table.add_row(p.image, str(p.label), f"{100 * p.probability:.1f} %", *([rest] if top > 1 else []))
        Console().print(table)
    if problems:
        log(f"[yellow]skipped {len(problems)} bad image(s)[/]; first: {problems[0]}")
    if grid is not None:
        from vembed.index.grid import draw_captioned

        truth = {str(r.image): r.label for r in records}
        items = [
            (Path(p.image), _caption(p, truth.get(p.image)), _colour(p, truth.get(p.image)))
            for p in predictions
        ]
        log(f"wrote {draw_captioned(items, grid)}")


def _caption(prediction, label) -> tuple[str, ...]:
    first = f"{prediction.label} {100 * prediction.probability:.1f}%"
    return (first, f"true: {label}") if label is not None else (first,)


def _colour(prediction, label) -> tuple[int, int, int]:
    from vembed.index.grid import border_colour

    return border_colour(label, prediction.label)
