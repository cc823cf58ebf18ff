"""``vembed export`` / ``vembed quickstart``: not implemented yet (issue 4)."""

import typer

from vembed.cli.app import app


@app.command("export", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def export_command() -> None:
    """Not yet: write a model folder plain transformers can load (issue 4)."""
    typer.echo("vembed export is not implemented yet", err=True)
    raise typer.Exit(1)


@app.command("quickstart")
def quickstart_command() -> None:
    """Not yet: the offline end-to-end demonstration (issue 4)."""
    typer.echo("vembed quickstart is not implemented yet", err=True)
    raise typer.Exit(1)
