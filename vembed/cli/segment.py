"""``vembed eval segmentation`` and ``vembed predict-masks``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from vembed.cli.app import app, quiet_transformers, settings_from
from vembed.cli.evaluate import eval_app
from vembed.console import log
from vembed.errors import VembedError
from vembed.io import write_json, write_text
from vembed.settings import settings_to_yaml

PLOTTED_IMAGES = 4


@eval_app.command("segmentation")
def segmentation_command(
    model: str = typer.Option(
        None, "--model", "-m", help="A segmentation model: a run's final/ or a `vembed export` folder."
    ),
    data: Path = typer.Option(
        None,
        "--data",
        "-d",
        help="Mask records (JSONL), or a prepared folder (its val.jsonl). Default: data.val.",
    ),
    corruptions: str = typer.Option(
        None, "--corruptions", help="Also under ImageNet-C corruptions: all, or names (fog,snow,...)."
    ),
    severity: str = typer.Option(
        None, "--severity", help="Corruption severities: 5, 1-5 or 1,3,5 (default 1-5)."
    ),
    json_out: Path = typer.Option(None, "--json", help="Write the metrics here as JSON."),
    plot: Path = typer.Option(
        None, "--plot", help="PNG: image / ground truth / prediction panels, mIoU against severity."
    ),
    compare: list[str] = typer.Option(None, "--compare", help="Also evaluate these models (repeatable)."),
    full_res: bool = typer.Option(
        False,
        "--full-res",
        help="Sliding windows over the original image instead of resizing to the input size.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the corruptions' randomness."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML recipe."),
    skip_bad: bool = typer.Option(None, "--skip-bad", help="Skip and count bad records."),
    overrides: list[str] = typer.Argument(None, help="key=value settings overrides."),
) -> None:
    """mIoU, pixel accuracy and per-class IoU (one confusion matrix over the split), optionally under corruptions."""
    from vembed.evaluation.compare import compare as compare_models
    from vembed.models.segmenter import create_segmenter, saved_segmenter_head
    from vembed.tasks.segmentation.corruptions import parse_corruptions
    from vembed.tasks.segmentation.evaluator import SegEvalOptions, SegmentationEvaluator
    from vembed.tasks.segmentation.plots import plot_report
    from vembed.tasks.segmentation.report import (
        parse_severities,
        read_mask_records,
        segmentation_json,
        segmentation_report,
        segmentation_table,
    )

    settings = settings_from(config, overrides, model__name=model, data__skip_bad=skip_bad)
    data = data or settings.data.val or settings.data.test
    if data is None:
        raise VembedError("no evaluation data: pass --data FILE.jsonl (or set data.val)")
    if data.is_dir():
        data = data / "val.jsonl"
    models = [settings.model.name, *(compare or [])]
    for name in models:  # every model checked before any data is read
        if saved_segmenter_head(name) is None:
            raise VembedError(
                f"{name}: not a segmentation model (its vembed.json has no segmenter task_head); "
                "give a run's final/ or a `vembed export` of a segmentation run"
            )
    options = SegEvalOptions(
        batch_size=settings.eval.batch_size,
        num_workers=settings.data.num_workers,
        full_res=full_res,
        corruptions=tuple(parse_corruptions(corruptions)),
        severities=tuple(parse_severities(severity)),
        seed=seed,
        max_pixels=settings.data.max_image_pixels,
    )

    records = read_mask_records(data, image_root=settings.data.image_root, skip_bad=settings.data.skip_bad)
    classes = _class_count(data)
    quiet_transformers()
    result = compare_models(
        models,
        SegmentationEvaluator(records, options, description="clean"),
        load=lambda name: create_segmenter(name, settings.model, num_classes=classes),
        keep_first=plot is not None,
        announce=lambda name: f"evaluating [bold]{name}[/] on {data} ({len(records):,} images)",
    )
    reports = [segmentation_report(s, data=str(data)) for s in result.scored]
    Console(stderr=False).print(segmentation_table(reports, title=f"segmentation on {data}"))
    if json_out is not None:
        write_json(json_out, segmentation_json(reports))
        write_text(json_out.with_suffix(".settings.yaml"), settings_to_yaml(settings))
        log(f"wrote {json_out}")
    if plot is not None:
        plot_report(
            plot,
            result.first_model,
            records[:PLOTTED_IMAGES],
            reports[0].corruptions,
            title=reports[0].model,
            clean=reports[0].metrics.miou,
        )
        log(f"wrote {plot}")


def _class_count(data: Path) -> int | None:
    """The class count of ``classes.txt`` beside the records (written by `vembed prepare`), if any."""
    from vembed.data.prepare.segmasks import CLASSES, read_class_names

    path = data.parent / CLASSES
    return len(read_class_names(path)) if path.is_file() else None


@app.command("predict-masks")
def predict_masks_command(
    model: str = typer.Argument(
        ..., help="A segmentation model: a run's final/ or a `vembed export` folder."
    ),
    images: str = typer.Argument(..., help="A folder, a JSONL of records, one image, or - (paths on stdin)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for <image stem>.png masks."),
    overlay: bool = typer.Option(
        False, "--overlay", help="Also write <image stem>.overlay.png colour overlays."
    ),
    full_res: bool = typer.Option(False, "--full-res", help="Sliding windows over the original image."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip images that do not decode."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML recipe (model.device, model.dtype ...)."),
    overrides: list[str] = typer.Argument(None, help="key=value settings overrides."),
) -> None:
    """A PNG mask per image (one channel, class indices, the image's original size), optional overlays."""
    from vembed.index.sources import records_from_source
    from vembed.models.segmenter import create_segmenter
    from vembed.tasks.segmentation.masks import predict_masks

    settings = settings_from(config, overrides, model__name=model)
    records, problems = records_from_source(images, skip_bad=skip_bad)
    quiet_transformers()
    segmenter = create_segmenter(model, settings.model)
    result = predict_masks(
        segmenter,
        records,
        out,
        overlays=overlay,
        full_res=full_res,
        skip_bad=skip_bad,
        max_pixels=settings.data.max_image_pixels,
    )
    for problem in [*problems, *result.problems]:
        log(f"[yellow]skipped:[/] {problem}")
    log(
        f"wrote {len(result.masks):,} masks"
        + (f" and {len(result.overlays):,} overlays" if overlay else "")
        + f" to [bold]{out}[/] ({segmenter.num_classes} classes: {', '.join(segmenter.class_names[:6])}"
        + (", ...)" if segmenter.num_classes > 6 else ")")
    )
