"""``metrics.jsonl``: one JSON object per training log and per validation, rewritten atomically."""

from __future__ import annotations

import json
from pathlib import Path

from vembed.io import write_jsonl

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """The rows of a run's ``metrics.jsonl``; every :meth:`append` rewrites the file (temp + rename).

    ``on_row`` also receives each row (e.g. accelerate's tensorboard tracker).
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True, on_row=None):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.on_row = on_row
        self.rows: list[dict] = []

    def resume(self, step: int) -> None:
        """Keep the rows up to ``step`` (rows a killed run wrote after its last checkpoint are dropped)."""
        if not self.path.is_file():
            return
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                rows.append(row)
        self.rows = rows
        if self.enabled:
            write_jsonl(self.path, self.rows)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.enabled:
            write_jsonl(self.path, self.rows)
            if self.on_row is not None:
                self.on_row(row)
