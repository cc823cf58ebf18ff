"""Cached backbone features for ``method=frozen``: the backbone runs once, the head trains on the cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vembed.data.records import ImageRecord
from vembed.inference import embed_records
from vembed.models.embedder import Embedder


class _FeatureEncoder:
    """Looks like an Embedder to :func:`embed_records`, but returns pooled backbone features."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        self.spec = embedder.spec
        self.embed_dim = embedder.feature_dim

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        model = self.embedder
        was_training = model.training
        model.eval()
        try:
            out = model.features(pixel_values.to(model.device, model.dtype, non_blocking=True))
        finally:
            model.train(was_training)
        return out.float().cpu()


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
        _FeatureEncoder(embedder),  # type: ignore[arg-type]
        records,
        batch_size=batch_size,
        num_workers=num_workers,
        skip_bad=skip_bad,
        show_progress=show_progress,
        description=description,
    )
    return result.embeddings, result.indices, result.problems
