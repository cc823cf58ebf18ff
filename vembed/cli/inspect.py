"""``vembed models`` and ``vembed config show``: look at the registry and the resolved settings."""

from __future__ import annotations

import io
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from vembed.cli.app import app
from vembed.models.registry import list_models
from vembed.settings import load_settings, settings_to_yaml

config_app = typer.Typer(help="Inspect settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")


# most useful first: at a narrow terminal the columns at the end are left out (description wraps)
_MODEL_COLUMNS = ("name", "hub id", "dim", "size", "patch", "pooling", "family", "description")
_MIN_DESCRIPTION = 16


def _model_rows() -> list[tuple[str, ...]]:
    return [
        (
            spec.name,
            spec.source,
            str(spec.embed_dim),
            str(spec.image_size),
            str(spec.patch_size),
            spec.pooling,
            spec.family,
            spec.description,
        )
        for spec in list_models()
    ]


def models_table(rows: list[tuple[str, ...]], width: int) -> Table:
    """The registry as a table that fits ``width`` columns: whole columns in :data:`_MODEL_COLUMNS`
    order while they fit, then the description wrapped into what is left (if at least 16 wide)."""
    measure = Console(width=10_000, file=io.StringIO())
    keep = [0, 1]
    for i in range(2, len(_MODEL_COLUMNS)):
        size = measure.measure(_table(rows, [*keep, i], None))
        wraps = _MODEL_COLUMNS[i] == "description"
        if (size.minimum if wraps else size.maximum) > width:
            break
        keep.append(i)
    left_out = [h for i, h in enumerate(_MODEL_COLUMNS) if i not in keep]
    caption = f"left out at {width} columns: {', '.join(left_out)} (`vembed models | cat` prints all)"
    return _table(rows, keep, caption if left_out else None)


def _table(rows: list[tuple[str, ...]], keep: list[int], caption: str | None) -> Table:
    table = Table(
        title="vembed model registry",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        caption=caption,
    )
    for i in keep:
        if _MODEL_COLUMNS[i] == "description":
            table.add_column("description", overflow="fold", min_width=_MIN_DESCRIPTION)
        else:
            table.add_column(_MODEL_COLUMNS[i], no_wrap=True)
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    return table


@app.command("models")
def models_command() -> None:
    """List the model registry (any other hub id or local folder works too): a table fitted to the
    terminal's width, tab-separated values with a header line when piped."""
    rows = _model_rows()
    console = Console()
    if not console.is_terminal:
        for line in [_MODEL_COLUMNS, *rows]:
            typer.echo("\t".join(line))
        return
    console.print(models_table(rows, console.width))


@config_app.command("show")
def config_show(
    recipe: Path = typer.Argument(..., help="YAML recipe (vembed or vembed-factory format)."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. train.lr=3e-4."),
) -> None:
    """Print the fully resolved settings (recipe + overrides + defaults) as YAML."""
    settings = load_settings(recipe, overrides)
    Console().print(Syntax(settings_to_yaml(settings), "yaml", background_color="default"))
