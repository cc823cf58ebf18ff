"""``vembed models`` and ``vembed config show``: look at the registry and the resolved settings."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from vembed.cli.app import app
from vembed.models.registry import list_models
from vembed.settings import load_settings, settings_to_yaml

config_app = typer.Typer(help="Inspect settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@app.command("models")
def models_command() -> None:
    """List the model registry (any other hub id or local folder works too)."""
    table = Table(title="vembed model registry")
    for column in ("name", "hub id"):
        table.add_column(column, no_wrap=True)
    for column in ("family", "size", "patch", "dim", "pooling", "description"):
        table.add_column(column, overflow="fold")
    for spec in list_models():
        table.add_row(
            spec.name,
            spec.source,
            spec.family,
            str(spec.image_size),
            str(spec.patch_size),
            str(spec.embed_dim),
            spec.pooling,
            spec.description,
        )
    Console().print(table)


@config_app.command("show")
def config_show(
    recipe: Path = typer.Argument(..., help="YAML recipe (vembed or vembed-factory format)."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. train.lr=3e-4."),
) -> None:
    """Print the fully resolved settings (recipe + overrides + defaults) as YAML."""
    settings = load_settings(recipe, overrides)
    Console().print(Syntax(settings_to_yaml(settings), "yaml", background_color="default"))
