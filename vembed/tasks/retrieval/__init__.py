"""``train.task: retrieval``: an embedding model (with a classifier head when the loss trains one)."""

from vembed.tasks.retrieval.task import RetrievalTask

__all__ = ["RetrievalTask"]
