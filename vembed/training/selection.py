"""Which validated model a run keeps: ``train.select``, ``train.select_metric``, ``train.select_smoothing``.

Metric-name driven: any key a validation row reports (``recall@1``, ``map@r``, ``top1`` ...) can rank
models; higher is better. With smoothing ``n`` a row's score is the mean of the metric over it and the
``n - 1`` validations before it, so one lucky validation on a small set does not win; only rows with a
full window compete (until there are ``n`` validations the latest one stands in). Ties go to the later
model (a validation set too easy to move never keeps the untrained model). The defaults (MAP@R, smoothed
over 3) come from ``bench/quality.py``: see docs/training.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from vembed.errors import VembedError

# Below this many queries a ranking metric's granularity and noise are of the size of real differences.
FEW_QUERIES = 500


@dataclass(frozen=True)
class Selection:
    metric: str = "map@r"
    mode: str = "best"  # "best": the best-scoring validation; "last": the last step
    smoothing: int = 3

    def score(self, history: list[dict], index: int) -> float:
        """The (smoothed) metric of ``history[index]``."""
        window = history[max(0, index - self.smoothing + 1) : index + 1]
        values = [self.value(row) for row in window]
        return sum(values) / len(values)

    def value(self, row: dict) -> float:
        if self.metric not in row:
            reported = ", ".join(k for k, v in row.items() if isinstance(v, float) and k not in ("epoch",))
            raise VembedError(
                f"train.select_metric={self.metric!r} is not reported by validation (it reports: {reported})"
            )
        return float(row[self.metric])

    def improves(self, history: list[dict]) -> bool:
        """Whether the last row of ``history`` becomes the selected model (see :meth:`choose`)."""
        last = len(history) - 1
        if self.mode == "last" or last < self.smoothing - 1:
            return True  # before a full window the latest validation stands in
        self.value(history[last])  # an unknown metric fails on the first validation
        first = self.smoothing - 1
        return all(self.score(history, last) >= self.score(history, i) for i in range(first, last))

    def choose(self, history: list[dict]) -> dict | None:
        """The selected row of a validation history (None when empty)."""
        chosen = None
        for i in range(len(history)):
            if self.improves(history[: i + 1]):
                chosen = history[i]
        return chosen

    def describe(self) -> str:
        if self.mode == "last":
            return "last step"
        smoothed = f", mean of {self.smoothing} validations" if self.smoothing > 1 else ""
        return f"best validation {self.metric}{smoothed}"


def resolution_warning(row: dict, metric: str) -> str | None:
    """A warning when ``row`` (a validation) has too few queries to rank models by ``metric``."""
    queries = row.get("num_queries")
    if not isinstance(queries, int) or queries >= FEW_QUERIES:
        return None
    step = 100.0 / max(queries, 1)
    grain = (
        f"{metric} moves in steps of {step:.2f} points"
        if metric.startswith(("recall@", "top", "precision@", "accuracy"))
        else f"one query changes {metric} by up to {step:.2f} points"
    )
    return (
        f"the validation set has {queries} queries: {grain}, so differences between models of about that "
        f"size are noise; use a larger data.val (>= {FEW_QUERIES} queries) to rank models reliably"
    )
