"""``vembed train``: not implemented yet (issue 4)."""

import typer

from vembed.cli.app import app


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_command() -> None:
    """Not yet: fine-tune a backbone (issue 4)."""
    typer.echo("vembed train is not implemented yet", err=True)
    raise typer.Exit(1)
