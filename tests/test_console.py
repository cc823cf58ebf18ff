"""The shared progress bar: a rate column that shows a real rate even when the caller keeps none."""

from __future__ import annotations

import io

from rich.console import Console

from vembed import console as vconsole


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _bar(monkeypatch):
    monkeypatch.setattr(vconsole, "console", Console(file=io.StringIO(), force_terminal=True, width=160))
    clock = _Clock()
    bar = vconsole.progress(vconsole.rate_column())
    bar.get_time = clock
    return bar, clock


def test_rate_column_without_a_rate_field_is_completed_over_elapsed(monkeypatch):
    bar, clock = _bar(monkeypatch)
    task_id = bar.add_task("segmenting", total=100)
    bar.start_task(task_id)
    clock.now += 4.0
    bar.update(task_id, completed=50)
    task = bar.tasks[0]
    assert task.elapsed == 4.0
    assert vconsole.rate_column().render(task).plain.strip() == "12.5 img/s"


def test_rate_column_prefers_the_rate_the_caller_measured(monkeypatch):
    bar, clock = _bar(monkeypatch)
    task_id = bar.add_task("training", total=10, rate=0.0)
    clock.now += 2.0
    bar.update(task_id, completed=5)
    assert vconsole.rate_column().render(bar.tasks[0]).plain.strip() == "0.0 img/s"  # not measured yet
    bar.update(task_id, rate=321.0)
    assert vconsole.rate_column().render(bar.tasks[0]).plain.strip() == "321.0 img/s"
