"""Logging and progress on stderr, so stdout stays free for JSON lines."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

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


class RateColumn(ProgressColumn):
    """Items per second: ``task.fields['rate']`` when the caller keeps one (``add_task(..., rate=...)``),
    else the bar's own count over its elapsed time, so a bar that only advances still shows a rate."""

    def __init__(self, unit: str = "img/s") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        rate = task.fields.get("rate")
        if rate is None:
            elapsed = task.elapsed
            rate = task.completed / elapsed if elapsed else 0.0
        return Text(f"{rate:>7.1f} {self.unit}")


def rate_column(unit: str = "img/s") -> RateColumn:
    """A column of items per second (``task.fields['rate']``, or completed / elapsed without that field)."""
    return RateColumn(unit)
