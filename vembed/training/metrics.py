"""``metrics.jsonl``: one JSON object per training log and per validation, appended as the run goes.

Appending keeps each row O(1) (no rewrite, no fsync inside the timed loop); a resumed run first
truncates the file to the rows of its checkpoint (rewritten atomically), then appends again. A line cut
short by a kill is dropped on that truncation.
"""

from __future__ import annotations

import json
from pathlib import Path

from vembed.io import append_jsonl, write_jsonl

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """The rows of a run's ``metrics.jsonl`` (kept in memory for the curves plot)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.rows: list[dict] = []

    def resume(self, step: int) -> None:
        """Keep the rows up to ``step`` (rows a killed run wrote after its last checkpoint are dropped)."""
        rows = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= step:
                    rows.append(row)
        self.rows = rows
        if self.enabled and (rows or self.path.is_file()):
            write_jsonl(self.path, rows)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.enabled:
            append_jsonl(self.path, row)
