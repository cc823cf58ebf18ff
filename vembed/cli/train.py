"""``vembed train``: fine-tune a backbone from a recipe (also under ``accelerate launch -m vembed train``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vembed.cli.app import app, quiet_transformers, settings_from


@app.command("train")
def train_command(
    config: Path = typer.Option(
        None, "--config", "-c", help="YAML recipe (vembed or vembed-factory format)."
    ),
    overrides: list[str] = typer.Argument(None, help="key=value settings overrides, e.g. train.lr=3e-4."),
    resume: bool = typer.Option(
        None, "--resume", help="Continue from the last checkpoint in train.output_dir (train.resume=true)."
    ),
    output_dir: Path = typer.Option(None, "--output-dir", "-o", help="Run directory (train.output_dir)."),
    model: str = typer.Option(None, "--model", "-m", help="Backbone: registry name, hub id or folder."),
    data: Path = typer.Option(None, "--data", "-d", help="Training records (data.train)."),
    val: Path = typer.Option(None, "--val", help="Validation records (data.val), never the test split."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-validation lines."),
) -> None:
    """Fine-tune a backbone (LoRA, full or frozen) and write RUN_DIR/final, a model every --model accepts.

    Writes settings.yaml, metrics.jsonl and checkpoints/ into the run directory; validates on data.val
    at each epoch end and keeps the best model. A stopped run continues with --resume.
    """
    from vembed.training import train  # torch: imported on use

    settings = settings_from(
        config,
        overrides,
        train__resume=resume,
        train__output_dir=output_dir,
        model__name=model,
        data__train=data,
        data__val=val,
    )
    quiet_transformers()
    result = train(settings, show_progress=not quiet)  # a stop signal: cli/failures.py says where it saved
    if result.main_process:
        from vembed.tasks import get_task

        Console().print(_summary(result, get_task(settings.train.task).metrics(settings)))


def _summary(result, reported: list[str]) -> Table:
    """The validations (the task's reported metrics, in its order) with the selected row marked."""
    from vembed.evaluation.base import as_percent

    table = Table(title=f"vembed train: {result.run_dir}")
    table.add_column("step")
    metric_keys = [key for key in reported if any(key in row for row in result.history)]
    for key in metric_keys:
        table.add_column(key, justify="right")
    table.add_column("")
    selected_step = result.best["step"] if result.best else None
    last_step = result.history[-1]["step"] if result.history else None
    for row in _some_rows(result.history, selected_step):
        label = _label(row["step"], selected_step, last_step, result.selected)
        style = "bold green" if label.endswith("final/") else None
        cells = (f"{as_percent(k, row[k]):.2f}" if isinstance(row.get(k), float) else "" for k in metric_keys)
        table.add_row(str(row["step"]), *cells, label, style=style)
    table.caption = (
        f"{result.steps} steps, {result.images_per_second:.1f} img/s, {result.seconds:.0f} s; "
        f"final model ({result.selected}): {result.final_dir}"
    )
    return table


def _label(step: int, selected: int | None, last: int | None, mode: str) -> str:
    parts = []
    if step == 0:
        parts.append("before training")
    if step == last:
        parts.append("last")
    if step == selected or (mode == "last" and step == last):
        parts.append("selected → final/")
    return ", ".join(parts)


def _some_rows(history: list[dict], best_step: int | None, most: int = 12) -> list[dict]:
    """All validations of a short run; of a long one the first, the selected, the last and some between."""
    if len(history) <= most:
        return history
    every = -(-len(history) // (most - 3))
    keep = {0, len(history) - 1, *range(0, len(history), every)}
    keep |= {i for i, row in enumerate(history) if row["step"] == best_step}
    return [history[i] for i in sorted(keep)]
