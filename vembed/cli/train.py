"""``vembed train`` / ``export`` / ``quickstart``: not implemented yet (issue 4)."""

import typer

from vembed.cli.app import app


def _not_yet(name: str):
    @app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def command() -> None:
        typer.echo(f"vembed {name} is not implemented yet", err=True)
        raise typer.Exit(1)

    command.__doc__ = f"Not yet: {name} (issue 4)."
    return command


for _name in ("train", "export", "quickstart"):
    _not_yet(_name)
