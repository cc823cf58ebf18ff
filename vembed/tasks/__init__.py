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


__all__ = ["TASKS", "Task", "TrainParts", "get_task"]
