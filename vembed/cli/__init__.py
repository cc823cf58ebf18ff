"""The ``vembed`` command line: one Typer app, one module per group of subcommands.

Each module parses options, calls one library function and renders its result; no logic that a
Python user of the library would also need lives here.
"""

from __future__ import annotations

from vembed.cli import (  # noqa: F401  (registers commands)
    classify,
    embed,
    eval_classes,
    eval_image_text,
    evaluate,
    export,
    index,
    inspect,
    mine,
    prepare,
    segment,
    serve,
    store,
    train,
    visualize,
)
from vembed.cli.app import app


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
