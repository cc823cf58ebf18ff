"""The evaluators' small option objects, and the one place they are made from settings.

Evaluators take these, never the whole ``Settings``; the CLI, the quickstart and training validation
build them with the ``*_options(settings)`` functions below (settings are only read here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vembed.inference import EmbedOptions, embed_options

if TYPE_CHECKING:
    from vembed.settings import Settings

__all__ = ["EmbedOptions", "RecordOptions", "RetrievalOptions", "embed_options", "record_options"]


@dataclass(frozen=True)
class RecordOptions:
    """How records files are read (``data.image_root``, ``data.skip_bad``)."""

    image_root: Any = None
    skip_bad: bool = False


@dataclass(frozen=True)
class RetrievalOptions:
    """How :class:`~vembed.evaluation.run.RetrievalEvaluator` ranks (``eval.k``, ``eval.chunk_size``).

    ``dims``: also score these truncated widths of the same embeddings; ``index`` (a faiss kind) takes
    the neighbours from that index (``index_settings``: an ``IndexSettings``); ``device``: where exact
    ranking runs (None: the model's GPU when it has one, else the CPU); ``rerank`` (a
    :class:`vembed.rerank.Reranker`) re-scores each query's first ``top_n`` neighbours (default: the
    re-ranker's own ``top_n``).
    """

    ks: tuple[int, ...] = (1, 10, 100)
    chunk_size: int = 4096
    dims: tuple[int, ...] = ()
    index: str | None = None
    index_settings: Any = None
    device: Any = None
    rerank: Any = None
    top_n: int | None = None


def record_options(settings: Settings) -> RecordOptions:
    return RecordOptions(settings.data.image_root, settings.data.skip_bad)


def retrieval_options(
    settings: Settings, *, dims=(), index: str | None = None, rerank=None, top_n: int | None = None
) -> RetrievalOptions:
    """``eval.k`` and ``eval.chunk_size`` (``index.*`` with ``index``)."""
    return RetrievalOptions(
        rerank=rerank,
        top_n=top_n,
        ks=tuple(settings.eval.k),
        chunk_size=settings.eval.chunk_size,
        dims=tuple(dims),
        index=index,
        index_settings=settings.index if index is not None else None,
    )


def retrieval_setup(settings: Settings, *, dims=(), index: str | None = None) -> dict:
    """The keywords of :func:`vembed.evaluation.run.evaluate_retrieval` from settings."""
    return {
        "model_settings": settings.model,
        "records": record_options(settings),
        "embed": embed_options(settings),
        "options": retrieval_options(settings, dims=dims, index=index),
    }
