"""The summary of a prepared data set: counts per split, images per class, problems — JSON and a table."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from vembed import __version__
from vembed.data.prepare.problems import ProblemLog
from vembed.data.records import ImageRecord

SHOWN_PROBLEMS = 50  # in summary.json; problems.txt lists them all


def split_stats(records: Sequence[ImageRecord]) -> dict[str, Any]:
    """Images, classes, categories and images per class (min/median/max) of some records."""
    per_class = Counter(rec.label for rec in records)
    sizes = sorted(per_class.values())
    categories = {rec.category for rec in records if rec.category is not None}
    return {
        "images": len(records),
        "classes": len(per_class),
        "categories": len(categories),
        "images_per_class": {
            "min": sizes[0] if sizes else 0,
            "median": float(statistics.median(sizes)) if sizes else 0.0,
            "max": sizes[-1] if sizes else 0,
        },
        "single_image_classes": sum(1 for n in sizes if n == 1),
    }


@dataclass(frozen=True)
class Provenance:
    """Where prepared data came from and how it was made (the options given): what ``summary.json``
    starts with."""

    dataset: str
    source: str
    seed: int
    options: dict[str, Any]

    def summary(self, **extra: Any) -> dict[str, Any]:
        """``dataset``, then ``extra`` (a ``task``), ``source``, ``seed``, ``options`` and ``vembed_version``."""
        return {
            "dataset": self.dataset,
            **extra,
            "source": self.source,
            "seed": self.seed,
            "options": self.options,
            "vembed_version": __version__,
        }


def build_summary(
    made: Provenance,
    *,
    records: Sequence[ImageRecord],
    splits: dict[str, Sequence[ImageRecord]],
    files: dict[str, str],
    log: ProblemLog,
) -> dict[str, Any]:
    """Everything worth knowing about the prepared data, deterministic (no timestamps)."""
    return {
        **made.summary(),
        **split_stats(records),
        "splits": {name: {"file": files.get(name), **split_stats(recs)} for name, recs in splits.items()},
        "problems": {
            "counts": log.counts(),
            "first": [str(p) for p in log.items[:SHOWN_PROBLEMS]],
        },
    }


def summary_table(summary: dict[str, Any], out: str | None = None) -> Table:
    """A rich table: one row for the whole data set, one per split file."""
    table = Table(
        title=f"{summary['dataset']} → {out}" if out else summary["dataset"],
        caption="min/med/max: images per class; lone: classes with one image (no positive for all-vs-all)",
    )
    with_categories = summary["categories"] > 0
    columns = [
        "split",
        "images",
        "classes",
        *(["cat."] if with_categories else []),
        "min",
        "med",
        "max",
        "lone",
    ]
    for column in columns:
        table.add_column(column, justify="left" if column == "split" else "right", no_wrap=column == "split")

    def row(name: str, stats: dict[str, Any], style: str | None = None) -> None:
        per = stats["images_per_class"]
        lone = stats["single_image_classes"]
        cells = [name, f"{stats['images']:,}", f"{stats['classes']:,}"]
        cells += [f"{stats['categories']:,}"] if with_categories else []
        cells += [
            str(per["min"]),
            f"{per['median']:g}",
            str(per["max"]),
            f"[yellow]{lone:,}[/]" if lone else "0",
        ]
        table.add_row(*cells, style=style)

    row("all", summary, style="bold")
    for name, stats in summary["splits"].items():
        if stats["file"] is None:
            table.add_row(f"[yellow]{name} (empty: not written)[/]", *["0"] * (len(columns) - 1))
        else:
            row(stats["file"], stats)
    return table


def problem_lines(summary: dict[str, Any]) -> list[str]:
    """Short lines describing the problems, for the console under the table."""
    counts = summary["problems"]["counts"]
    if not counts:
        return []
    lines = ["problems: " + ", ".join(f"{n:,} {kind}" for kind, n in counts.items())]
    lines += [f"  {p}" for p in summary["problems"]["first"][:10]]
    total = sum(counts.values())
    if total > 10:
        lines.append(f"  ... {total - 10:,} more in problems.txt")
    return lines
