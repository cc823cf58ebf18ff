"""Embed image records into a store, or stream them as JSON lines (``vembed embed``)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from vembed.data.records import ImageRecord
from vembed.errors import VembedError
from vembed.index.store import EmbeddingStore, build_store, is_store, write_store
from vembed.inference import EmbedOptions, embed_records, iter_embedding_batches
from vembed.models.embedder import Embedder


@dataclass
class EmbedSummary:
    count: int  # images embedded
    seconds: float
    problems: list[str] = field(default_factory=list)  # records and images skipped

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("nan")


def embed_to_store(
    embedder: Embedder,
    records: Sequence[ImageRecord],
    out: str | Path,
    *,
    model: str | Path,
    revision: str | None = None,
    source: str = "",
    options: EmbedOptions = EmbedOptions(),
    problems: Sequence[str] = (),
    settings_yaml: str | None = None,
) -> tuple[EmbeddingStore, EmbedSummary]:
    """Embed ``records`` and write the store folder ``out`` (atomically, only when all went well).

    ``model`` is what the store records to rebuild the embedder (registry name, hub id or folder);
    ``problems`` are records already skipped while reading the source, counted in the store's meta.
    """
    out = Path(out)
    if out.exists() and not is_store(out):  # fail before the slow part
        raise VembedError(f"{out} exists and is not a vembed store; refusing to replace it")
    result = embed_records(embedder, records, options)
    skipped = [*problems, *result.problems]
    kept = [records[i] for i in result.indices]
    check_finite(result.embeddings, kept)
    store = build_store(
        embedder, result.embeddings, kept, model=model, revision=revision, source=source, problems=skipped
    )
    write_store(store, out, settings_yaml=settings_yaml)
    return store, EmbedSummary(len(kept), result.seconds, skipped)


def stream_jsonl(
    embedder: Embedder,
    records: Sequence[ImageRecord],
    stream: TextIO,
    options: EmbedOptions = EmbedOptions(),
    *,
    problems: Sequence[str] = (),
) -> EmbedSummary:
    """Write ``{"path": ..., "label": ..., "embedding": [...]}`` lines to ``stream`` as batches finish.

    ``label`` appears only when the record has one. Floats keep 9 significant digits (exact float32).
    A bad image without ``skip_bad`` raises after the lines already written (stdout cannot be
    taken back): the exit status tells a pipeline that the stream is incomplete.
    """
    start = time.perf_counter()
    count = 0
    skipped = list(problems)
    for emb, indices, bad in iter_embedding_batches(embedder, records, options):
        skipped += bad
        check_finite(emb, [records[i] for i in indices])
        stream.write(
            "".join(embedding_line(records[i], vector) for i, vector in zip(indices, emb, strict=True))
        )
        stream.flush()
        count += len(indices)
    if count == 0:
        raise VembedError("no image could be embedded")
    return EmbedSummary(count, time.perf_counter() - start, skipped)


def check_finite(embeddings: torch.Tensor, records: Sequence[ImageRecord]) -> None:
    """Raise, naming the first image, when an embedding holds NaN or infinity (fp16 overflow)."""
    bad = ~torch.isfinite(embeddings).all(dim=1)
    if bad.any():
        first = records[int(bad.nonzero()[0])]
        raise VembedError(
            f"{first.image}: the model produced NaN/infinite values ({int(bad.sum())} image(s)); "
            "try model.dtype=float32"
        )


def embedding_line(record: ImageRecord, vector: torch.Tensor) -> str:
    """One JSON line for an embedded image."""
    head = {"path": str(record.image)}
    if record.label is not None:
        head["label"] = record.label
    numbers = ",".join(f"{v:.9g}" for v in vector.tolist())
    return json.dumps(head, ensure_ascii=False)[:-1] + f', "embedding": [{numbers}]}}\n'
