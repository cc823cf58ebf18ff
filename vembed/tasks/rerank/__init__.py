"""``train.task: rerank``: the pairwise re-ranker of an embedder's first neighbours (see ``task.py``)."""

from vembed.tasks.rerank.task import RerankTask

__all__ = ["RerankTask"]
