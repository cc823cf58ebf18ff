"""Embed image records with an :class:`Embedder` — the path shared by eval, embed and search."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from vembed.console import progress, rate_column
from vembed.data.datasets import ImageDataset, build_loader
from vembed.data.images import EvalTransform
from vembed.data.records import ImageRecord
from vembed.errors import VembedError
from vembed.models.embedder import Embedder

if TYPE_CHECKING:
    from vembed.settings import Settings


@dataclass(frozen=True)
class EmbedOptions:
    """How images are embedded: batch size, decoding workers, bad images skipped or an error, the
    progress bar, and the pixel limit (``data.max_image_pixels``; None: the default limit)."""

    batch_size: int = 64
    num_workers: int = 2
    skip_bad: bool = False
    show_progress: bool = True
    max_pixels: int | None = None


def embed_options(
    settings: Settings, *, batch_size: int | None = None, show_progress: bool = True
) -> EmbedOptions:
    """``data.num_workers``, ``data.skip_bad``, ``data.max_image_pixels`` and ``batch_size``
    (default ``eval.batch_size``; embedding a store passes ``index.batch_size``)."""
    return EmbedOptions(
        settings.eval.batch_size if batch_size is None else batch_size,
        settings.data.num_workers,
        settings.data.skip_bad,
        show_progress,
        settings.data.max_image_pixels,
    )


@dataclass
class Embeddings:
    """Embeddings for the records that decoded, in record order, plus the ones that did not."""

    embeddings: torch.Tensor  # [N_ok, D] float32
    indices: list[int]  # positions in the input records
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.indices) / self.seconds if self.seconds > 0 else float("nan")


def iter_embedding_batches(
    embedder: Embedder,
    records: Sequence[ImageRecord],
    options: EmbedOptions = EmbedOptions(),
    *,
    description: str = "embedding",
    pooled: bool = False,
    **fields,
) -> Iterator[tuple[torch.Tensor, list[int], list[str]]]:
    """Yield ``(embeddings, record indices, problems)`` batch by batch (for streaming output).

    ``fields`` replace those of ``options`` (``num_workers=0``). ``pooled=True`` yields pooled
    backbone features instead (see :meth:`Embedder.encode`).
    """
    opts = replace(options, **fields) if fields else options
    dataset = ImageDataset(
        records, EvalTransform(embedder.spec), skip_bad=opts.skip_bad, max_pixels=opts.max_pixels
    )
    batch_size = opts.batch_size
    loader = build_loader(
        dataset, batch_size=batch_size, num_workers=min(opts.num_workers, len(records) // batch_size + 1)
    )
    show_progress = opts.show_progress
    width = embedder.feature_dim if pooled else embedder.embed_dim
    start = time.perf_counter()
    done = 0
    with progress(rate_column(), enabled=show_progress) as bar:
        task = bar.add_task(description, total=len(records), rate=0.0, visible=show_progress)
        for batch in _without_worker_tracebacks(loader):
            problems = [b.message for b in batch.bad]
            emb = (
                embedder.encode(batch.pixel_values, pooled=pooled)
                if len(batch.indices)
                else torch.empty(0, width)
            )
            done += len(batch.indices) + len(batch.bad)
            bar.update(task, completed=done, rate=done / max(time.perf_counter() - start, 1e-9))
            yield emb, batch.indices.tolist(), problems


def _without_worker_tracebacks(loader, *, keep_workers: bool = False) -> Iterator:
    """Iterate ``loader``; a VembedError raised in a DataLoader worker comes back as its own one line.

    (The DataLoader re-raises worker exceptions with the worker's whole traceback in the message.)
    Workers are stopped as soon as iteration ends, errors or is abandoned: left to the garbage
    collector, a DataLoader that raised waits 5 s per worker before exiting. ``keep_workers``: a
    loader read to its end keeps them (persistent workers, for the next epoch).
    """
    iterator = iter(loader)
    finished = False
    try:
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                finished = True
                return
            except VembedError as exc:
                last = str(exc).rstrip().splitlines()[-1]
                raise VembedError(last.removeprefix(f"{VembedError.__module__}.VembedError: ")) from None
            yield batch
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
        if shutdown is not None and not (keep_workers and finished):
            shutdown()


def embed_records(
    embedder: Embedder, records: Sequence[ImageRecord], options: EmbedOptions = EmbedOptions(), **kwargs
) -> Embeddings:
    """Embed every record; see :func:`iter_embedding_batches` for the keywords."""
    start = time.perf_counter()
    chunks, indices, problems = [], [], []
    for emb, idx, bad in iter_embedding_batches(embedder, records, options, **kwargs):
        chunks.append(emb)
        indices.extend(idx)
        problems.extend(bad)
    width = embedder.feature_dim if kwargs.get("pooled") else embedder.embed_dim
    embeddings = torch.cat(chunks) if chunks else torch.empty(0, width)
    return Embeddings(embeddings, indices, problems, time.perf_counter() - start)
