"""Logging and progress on stderr, so stdout stays free for JSON lines."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def log(message: str) -> None:
    """Print a status line on stderr."""
    console.print(message, highlight=False, soft_wrap=True)


def progress(*extra_columns, enabled: bool = True) -> Progress:
    """A rich progress bar on stderr: description, bar, count, extra columns, elapsed, ETA.

    ``enabled=False`` prints nothing at all (for ``--quiet`` and library callers).
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not enabled or (not console.is_terminal and console.is_dumb_terminal),
    )


def rate_column(unit: str = "img/s") -> TextColumn:
    """A column showing ``task.fields['rate']`` (items per second)."""
    return TextColumn("{task.fields[rate]:>7.1f} " + unit)
