"""Render classification results: rich tables (deltas against the first model) and JSON."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from vembed.evaluation.fewshot import FewShotReport, ShotScore


def _delta_cell(value: float, base: float | None, std: float | None = None) -> str:
    cell = f"{100 * value:.2f}"
    if std is not None:
        cell += f" ±{100 * std:.2f}"
    if base is not None:
        delta = 100 * (value - base)
        colour = "green" if delta > 0 else "red" if delta < 0 else "dim"
        cell += f" [{colour}]({delta:+.2f})[/]"
    return cell


def fewshot_rows(report: FewShotReport) -> list[tuple[str, dict[str, dict[int, ShotScore]]]]:
    """``(row name, results)``: the model, then one row per ``--dims`` width."""
    return [(report.model, report.results)] + [
        (f"{report.model} @ {d}-d", results) for d, results in report.dims.items()
    ]


def fewshot_table(reports: Sequence[FewShotReport], title: str = "k-shot prototype accuracy") -> Table:
    """Top-1 % per k with the sets (seen, unseen) side by side; rows after the first show deltas."""
    rows = [row for report in reports for row in fewshot_rows(report)]
    sets = list(dict.fromkeys(name for _, results in rows for name in results))
    ks = sorted({k for _, results in rows for by_k in results.values() for k in by_k})
    table = Table(title=title + " (top-1 %)", title_justify="left")
    table.add_column("model", overflow="fold")
    for k in ks:
        for name in sets:
            table.add_column(f"{name} k={k}", justify="right")
    base = rows[0][1] if rows else {}
    for i, (name, results) in enumerate(rows):
        cells = []
        for k in ks:
            for s in sets:
                score = results.get(s, {}).get(k)
                if score is None:
                    cells.append("–")
                    continue
                ref = base.get(s, {}).get(k) if i > 0 else None
                cells.append(_delta_cell(score.top1, ref.top1 if ref else None, score.std))
        table.add_row(name, *cells)
    if rows:
        queries = ", ".join(
            f"{s}: {next(iter(by_k.values())).queries} queries" for s, by_k in rows[0][1].items() if by_k
        )
        table.caption = queries
    return table


def accuracy_table(title: str, rows: Sequence[tuple[str, str]], per_class: dict[str, float]) -> Table:
    """Headline numbers, then per-class accuracy (worst first) for kNN / linear probe / classify."""
    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    worst = sorted(per_class.items(), key=lambda kv: kv[1])
    shown = worst[:10]
    for label, acc in shown:
        table.add_row(f"class {label}", f"{100 * acc:.2f}")
    if len(worst) > len(shown):
        table.add_row(f"(+{len(worst) - len(shown)} classes)", "")
    return table
