"""``--compare``: one evaluator over several models, each loaded once, with deltas against the first.

Every ``vembed eval`` subcommand calls :func:`compare` (one model is a comparison of one) and renders
the :class:`Comparison` it returns (a rich table, JSON); nothing here prints a table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vembed.console import log
from vembed.evaluation.base import EvalResult, Evaluator


@dataclass
class Scored:
    """One model's result: the reference it was given by, the result, the seconds it took."""

    name: str
    result: EvalResult
    seconds: float = 0.0

    @property
    def metrics(self) -> dict[str, float]:
        return self.result.metrics

    @property
    def report(self):
        """The evaluator's report (``details["report"]``) named after this model, with its seconds."""
        report = self.result.details["report"]
        return replace(report, model=self.name, seconds=self.seconds)


@dataclass
class Comparison:
    """The results of one evaluator over models, in the order given (the first is the baseline).

    ``first_model`` is the first model, kept (``keep_first=True``) for pictures of its predictions.
    """

    evaluator: str
    primary_metric: str
    greater_is_better: bool
    scored: list[Scored] = field(default_factory=list)
    first_model: Any = None

    def reports(self) -> list:
        """Every model's report (see :attr:`Scored.report`), in order."""
        return [s.report for s in self.scored]

    @property
    def first(self) -> Scored:
        return self.scored[0]

    def delta(self, scored: Scored) -> dict[str, float]:
        """``scored``'s metrics minus the first's, for the metrics both report."""
        base = self.first.metrics
        return {k: v - base[k] for k, v in scored.metrics.items() if k in base}

    @property
    def best(self) -> Scored:
        """The model the primary metric ranks first (the earlier one on a tie)."""
        sign = 1 if self.greater_is_better else -1
        return max(self.scored, key=lambda s: sign * s.result.primary)


def compare(
    models: Sequence,
    evaluator: Evaluator,
    *,
    load: Callable[[Any], Any] | None = None,
    check: Callable[[Any], Any] | None = None,
    keep_first: bool = False,
    show_progress: bool = True,
    announce: Callable[[str], str] | None = None,
) -> Comparison:
    """Run ``evaluator`` on every model in ``models`` (references given to ``load``, or models).

    ``check`` sees every reference before the first evaluation starts (an unknown name fails
    before minutes of embedding); each model is loaded once, evaluated, and released before the next
    is loaded (except the first with ``keep_first``). ``announce(name)`` is logged before each.
    """
    names = [str(m) if load is not None else _name(m) for m in models]
    if check is not None:
        for model in models:
            check(model)
    out = Comparison(evaluator.name, evaluator.primary_metric, evaluator.greater_is_better)
    for i, (ref, name) in enumerate(zip(models, names, strict=True)):
        if announce is not None:
            log(announce(name))
        start = time.perf_counter()
        model = load(ref) if load is not None else ref
        result = evaluator(model, show_progress=show_progress)
        out.scored.append(Scored(name, result, time.perf_counter() - start))
        if i == 0 and keep_first:
            out.first_model = model
        del model
    return out


def comparison_json(reports: Sequence, delta_keys: Sequence[str] | None = None) -> dict:
    """The first report's JSON at the top level, the others' under ``"compare"``; with ``delta_keys``
    each of those also has ``"delta"``: its metrics minus the first's, for the keys it reports."""
    if not reports:
        return {}
    first, *others = reports
    out = first.to_json()
    if others:
        out["compare"] = [r.to_json() for r in others]
    if others and delta_keys is not None:
        for row, r in zip(out["compare"], others, strict=True):
            row["delta"] = {k: r.metrics[k] - first.metrics[k] for k in delta_keys if k in r.metrics}
    return out


def _name(model) -> str:
    spec = getattr(model, "spec", None)
    return spec.name if spec is not None else str(model)
