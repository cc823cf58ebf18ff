"""``vembed eval image-text`` and ``vembed eval zeroshot``: dual encoders (CLIP, SigLIP) with their text tower."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vembed.cli.app import quiet_transformers, settings_from
from vembed.cli.evaluate import MODEL_HELP, eval_app
from vembed.console import log
from vembed.errors import VembedError
from vembed.io import write_json, write_text
from vembed.settings import settings_to_yaml

DUAL_HELP = MODEL_HELP + " A dual encoder: clip-vit-b32, siglip-base, ... or a run of train.task=image_text."


def _delta(metric: str, value: float, base: float | None) -> str:
    from vembed.evaluation.base import as_percent

    cell = f"{as_percent(metric, value):.2f}"
    if base is None:
        return cell
    delta = as_percent(metric, value) - as_percent(metric, base)
    colour = "green" if delta > 0 else "red" if delta < 0 else "dim"
    return cell + f" [{colour}]({delta:+.2f})[/]"


@eval_app.command("image-text")
def image_text_command(
    model: str = typer.Option(None, "--model", "-m", help=DUAL_HELP + " Default: model.name."),
    data: Path = typer.Option(
        None, "--data", "-d", help='Captioned images (JSONL {"image", "text"} or {"image", "captions"}).'
    ),
    compare: list[str] = typer.Option(
        None, "--compare", help="Also evaluate these models (repeatable); the table shows deltas."
    ),
    json_out: Path = typer.Option(None, "--json", help="Write the metrics here as JSON."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML recipe."),
    overrides: list[str] = typer.Argument(None, help="key=value settings overrides."),
) -> None:
    """Text→image and image→text Recall@1/5/10 and rsum (the Flickr30k / COCO protocol).

    Every caption queries the images (its own image is the one right answer); every image queries the
    captions (right when any of its captions is retrieved).
    """
    from vembed.evaluation.image_text import METRICS, compare_image_text, comparison_json

    settings = settings_from(config, overrides, model__name=model)
    data = data or settings.data.test
    if data is None:
        raise VembedError("no evaluation data: pass --data captions.jsonl (or set data.test)")
    quiet_transformers()
    reports = compare_image_text([settings.model.name, *(compare or [])], data, settings=settings).reports()
    table = Table(title=f"image-text retrieval on {data}", title_justify="left")
    table.add_column("model", overflow="fold")
    for metric in METRICS:
        table.add_column(metric.replace("_recall", " R"), justify="right")
    base = reports[0].metrics
    for i, report in enumerate(reports):
        cells = [_delta(m, report.metrics[m], base[m] if i else None) for m in METRICS]
        table.add_row(report.model, *cells)
    Console().print(table)
    if json_out is not None:
        write_json(json_out, comparison_json(reports))
        write_text(json_out.with_suffix(".settings.yaml"), settings_to_yaml(settings))
        log(f"wrote {json_out}")


@eval_app.command("zeroshot")
def zeroshot_command(
    model: str = typer.Option(None, "--model", "-m", help=DUAL_HELP + " Default: model.name."),
    data: Path = typer.Option(None, "--data", "-d", help="Labelled records (JSONL with label)."),
    templates: Path = typer.Option(
        None,
        "--templates",
        help="Prompt templates, one a line with {} or {label}; default: CLIP's 80 ImageNet templates.",
    ),
    compare: list[str] = typer.Option(None, "--compare", help="Also evaluate these models (repeatable)."),
    json_out: Path = typer.Option(None, "--json", help="Write the results here as JSON."),
    plot: Path = typer.Option(None, "--plot", help="PNG of the confusion matrix (of --model)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML recipe."),
    overrides: list[str] = typer.Argument(None, help="key=value settings overrides."),
) -> None:
    """Zero-shot classification from class-name prompts: top-1 / top-5, per class, confusion matrix."""
    from vembed.evaluation.zeroshot import compare_zeroshot

    settings = settings_from(config, overrides, model__name=model)
    data = data or settings.data.test
    if data is None:
        raise VembedError("no evaluation data: pass --data labelled.jsonl (or set data.test)")
    quiet_transformers()
    models = [settings.model.name, *(compare or [])]
    reports = compare_zeroshot(models, data, templates=templates, settings=settings).reports()
    table = Table(title=f"zero-shot classification of {data}", title_justify="left")
    for column in ("model", "top-1", "top-5", "images", "classes", "templates"):
        table.add_column(column, justify="left" if column == "model" else "right")
    base = reports[0].metrics
    for i, r in enumerate(reports):
        m = r.metrics
        table.add_row(
            r.model,
            _delta("top1", m["top1"], base["top1"] if i else None),
            _delta("top5", m["top5"], base["top5"] if i else None),
            str(int(m["num_images"])),
            str(len(r.labels)),
            str(r.templates),
        )
    Console().print(table)
    if plot is not None:
        from vembed.evaluation.plots import plot_confusion

        first = reports[0]
        title = f"zero-shot {first.model}: top-1 {100 * first.metrics['top1']:.1f} %"
        log(f"wrote {plot_confusion(first.labels, first.confusion, plot, title=title)}")
    if json_out is not None:
        out = reports[0].to_json()
        if len(reports) > 1:
            out["compare"] = [r.to_json() for r in reports[1:]]
        write_json(json_out, out)
        log(f"wrote {json_out}")
