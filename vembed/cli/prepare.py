"""``vembed prepare``: not implemented yet (issue 5)."""

import typer

from vembed.cli.app import app


@app.command("prepare", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def prepare_command() -> None:
    """Not yet: public data sets and your own files → JSONL splits (issue 5)."""
    typer.echo("vembed prepare is not implemented yet", err=True)
    raise typer.Exit(1)
