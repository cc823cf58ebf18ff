"""``vembed eval segmentation``: a model's mIoU on mask records, clean and under corruptions, as a
report, a table, JSON and a plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from vembed.console import log
from vembed.data.records import SegRecord, read_records
from vembed.errors import VembedError
from vembed.evaluation.compare import Scored
from vembed.tasks.segmentation.corruptions import SEVERITIES
from vembed.tasks.segmentation.metrics import SegmentationMetrics


@dataclass
class SegmentationReport:
    model: str
    data: str
    metrics: SegmentationMetrics
    image_size: int
    full_res: bool
    corruptions: dict[str, dict[str, float]] = field(default_factory=dict)  # name → {severity: mIoU}
    seconds: float = 0.0

    def to_json(self) -> dict:
        out = {
            "model": self.model,
            "data": self.data,
            "image_size": self.image_size,
            "full_res": self.full_res,
            **self.metrics.to_json(),
        }
        if self.corruptions:
            out["corruptions"] = self.corruptions
            out["corruptions_mean"] = corruption_means(self.corruptions)
        out["seconds"] = round(self.seconds, 3)
        return out


def corruption_means(corruptions: dict[str, dict[str, float]]) -> dict[str, float]:
    """Severity → mIoU averaged over the corruptions."""
    severities = sorted({s for values in corruptions.values() for s in values}, key=int)
    return {
        s: sum(v[s] for v in corruptions.values() if s in v) / sum(1 for v in corruptions.values() if s in v)
        for s in severities
    }


def parse_severities(text: str | int | None) -> list[int]:
    """``"5"``, ``"1-5"`` or ``"1,3,5"`` → severities; None → 1-5."""
    if text is None:
        return list(SEVERITIES)
    text = str(text).strip()
    try:
        if "-" in text:
            lo, hi = (int(p) for p in text.split("-", 1))
            values = list(range(lo, hi + 1))
        else:
            values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise VembedError(f"--severity {text!r}: expected 5, 1-5 or 1,3,5") from None
    if not values or any(v not in SEVERITIES for v in values):
        raise VembedError(f"--severity {text!r}: severities are 1-5")
    return values


def read_mask_records(path: str | Path, *, image_root=None, skip_bad: bool = False) -> list[SegRecord]:
    """The image/mask records of a JSONL file (each skipped bad record logged)."""
    found = read_records(path, image_root=image_root, skip_bad=skip_bad)
    for problem in found.problems:
        log(f"[yellow]skipped:[/] {problem}")
    return found.masks()


def segmentation_report(scored: Scored, *, data: str) -> SegmentationReport:
    """The report of one model's :class:`~vembed.tasks.segmentation.evaluator.SegmentationEvaluator`
    result (from :func:`vembed.evaluation.compare.compare`)."""
    details = scored.result.details
    return SegmentationReport(
        scored.name,
        data,
        details["metrics"],
        details["image_size"],
        details["full_res"],
        details["corruptions"],
        scored.seconds,
    )


def segmentation_table(reports: list[SegmentationReport], title: str) -> Table:
    """One row per model, in percent: mIoU, pixel accuracy, mean corrupted mIoU per severity (deltas vs
    the first)."""
    table = Table(title=title)
    table.add_column("model", no_wrap=True)
    columns = ["miou", "pixel_accuracy"]
    severities = list(corruption_means(reports[0].corruptions)) if reports[0].corruptions else []
    for column in ("mIoU", "pixel acc."):
        table.add_column(column, justify="right")
    for s in severities:
        table.add_column(f"-C {s}", justify="right")
    first = reports[0]
    for report in reports:
        values = [getattr(report.metrics, c) for c in columns]
        base = [getattr(first.metrics, c) for c in columns]
        means = corruption_means(report.corruptions) if report.corruptions else {}
        first_means = corruption_means(first.corruptions) if first.corruptions else {}
        values += [means.get(s, float("nan")) for s in severities]
        base += [first_means.get(s, float("nan")) for s in severities]
        cells = []
        for value, ref in zip(values, base, strict=True):
            cell = f"{100 * value:.2f}"
            if report is not first:
                delta = 100 * (value - ref)
                colour = "green" if delta > 0 else "red" if delta < 0 else "dim"
                cell += f" [{colour}]({delta:+.2f})[/]"
            cells.append(cell)
        table.add_row(report.model, *cells)
    if severities:
        table.caption = "-C s: mIoU under the corruptions at severity s, averaged over " + ", ".join(
            first.corruptions
        )
    return table


def segmentation_json(reports: list[SegmentationReport]) -> dict:
    """The first report at the top level (``miou``, ``pixel_accuracy``, ``per_class_iou``,
    ``corruptions``), the others under ``compare`` with their deltas."""
    first, *others = reports
    out = first.to_json()
    if others:
        out["compare"] = [
            {
                **r.to_json(),
                "delta": {
                    "miou": r.metrics.miou - first.metrics.miou,
                    "pixel_accuracy": r.metrics.pixel_accuracy - first.metrics.pixel_accuracy,
                },
            }
            for r in others
        ]
    return out
