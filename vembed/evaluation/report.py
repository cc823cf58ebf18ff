"""Render evaluation results: rich tables (with deltas against a baseline) and JSON."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from vembed.evaluation.compare import comparison_json as with_deltas
from vembed.evaluation.run import RetrievalReport

COUNT_KEYS = ("num_queries", "num_skipped", "num_bad_images")


def metric_names(reports: Sequence[RetrievalReport]) -> list[str]:
    """Metric keys shown as percentages, in the order of the first report (recall@K..., map@r)."""
    names: list[str] = []
    for report in reports:
        names += [k for k in report.metrics if k not in COUNT_KEYS and k not in names]
    return names


def comparison_table(reports: Sequence[RetrievalReport], title: str = "retrieval") -> Table:
    """One row per model; from the second row on, each metric also shows its delta to the first."""
    names = metric_names(reports)
    table = Table(title=title, title_justify="left")
    table.add_column("model", overflow="fold")
    for name in names:
        table.add_column(name.replace("recall", "R"), justify="right")
    table.add_column("queries", justify="right")
    baseline = reports[0].metrics if reports else {}
    for i, report in enumerate(reports):
        cells = []
        for name in names:
            value = report.metrics.get(name)
            if value is None:
                cells.append("–")
                continue
            cell = f"{100 * value:.2f}"
            if i > 0 and name in baseline:
                delta = 100 * (value - baseline[name])
                colour = "green" if delta > 0 else "red" if delta < 0 else "dim"
                cell += f" [{colour}]({delta:+.2f})[/]"
            cells.append(cell)
        table.add_row(report.model, *cells, str(int(report.metrics.get("num_queries", 0))))
    return table


def comparison_json(reports: Sequence[RetrievalReport]) -> dict:
    """The first report's metrics at the top level (``recall@1`` ...), the others under ``compare``."""
    return with_deltas(reports, metric_names(reports[:1]))
