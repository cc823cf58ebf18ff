"""What an export reports: where, how many rows, how fast, and what its self-check found."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExportReport:
    target: str
    rows: int
    files: int
    seconds: float
    check: str  # what the self-check found, in words
    details: dict

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "rows": self.rows,
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rows_per_second, 1),
            "check": self.check,
            **self.details,
        }
