"""Cached backbone features for ``method=frozen``: the backbone runs once, the head trains on the cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vembed.data.records import ImageRecord
from vembed.inference import embed_records
from vembed.models.embedder import Embedder


def extract_features(
    embedder: Embedder,
    records: Sequence[ImageRecord],
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    skip_bad: bool = False,
    show_progress: bool = True,
    description: str = "caching features",
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Pooled backbone features of ``records`` (eval transform): ``(features [N_ok, F], indices, problems)``.

    Same decoding, preprocessing and batching as every other embedding path (:func:`embed_records`).
    """
    result = embed_records(
        embedder,
        records,
        pooled=True,
        batch_size=batch_size,
        num_workers=num_workers,
        skip_bad=skip_bad,
        show_progress=show_progress,
        description=description,
    )
    return result.embeddings, result.indices, result.problems
