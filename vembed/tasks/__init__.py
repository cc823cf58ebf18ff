"""The tasks vembed trains, found by ``train.task`` in one table.

Adding a task is one package under ``vembed/tasks/`` implementing :class:`vembed.tasks.base.Task`
and one entry in :data:`TASKS` (see ``docs/architecture.md``).
"""

from __future__ import annotations

import difflib

from vembed.errors import VembedError
from vembed.tasks.base import Task, TrainParts
from vembed.tasks.image_text import ImageTextTask
from vembed.tasks.rerank import RerankTask
from vembed.tasks.retrieval import RetrievalTask
from vembed.tasks.segmentation import SegmentationTask

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (RetrievalTask, SegmentationTask, ImageTextTask, RerankTask)
}


def get_task(name: str) -> Task:
    """The task named by ``train.task``, or one error listing the tasks (with a close match)."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise VembedError(f"train.task={name!r} is not a task vembed trains{hint}; tasks: {', '.join(TASKS)}")
    return TASKS[name]()


def check_task_keys(task: Task, train) -> None:
    """One error for a ``train.*`` key that only another task reads, set away from its default
    (``train.rerank_from`` on a retrieval run), instead of ignoring it."""
    for other in TASKS.values():
        if isinstance(task, other):
            continue
        for key in other.keys:
            if key in train.model_fields_set and getattr(train, key) != type(train).model_fields[key].default:
                raise VembedError(
                    f"train.{key} applies to train.task={other.name} only; this run is train.task={task.name}"
                )


__all__ = ["TASKS", "Task", "TrainParts", "check_task_keys", "get_task"]
