"""Step runners: how one micro-batch becomes gradients, one class per strategy.

- :class:`PixelSteps`: decode and augment images, run the model, backpropagate the loss;
- :class:`GradCacheSteps`: the same through the gradient cache (``train.grad_cache_chunk``);
- :class:`CachedFeatureSteps`: ``method=frozen`` with ``train.cache_features``: the backbone's pooled
  features are computed once and only the head (and the loss) trains on them.

:func:`step_runner` picks one; the loop only calls ``prepare``, ``micro_batches`` and
``forward_backward``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vembed.console import log
from vembed.errors import VembedError
from vembed.inference import _without_worker_tracebacks, embed_options, embed_records
from vembed.settings import Settings
from vembed.training.data import EpochLoaders, LabelledImages, train_loaders
from vembed.training.gradcache import grad_cache_backward


class ModelSteps:
    """What the step runners of every task share: ``module`` (the model) wrapped by accelerate,
    ``loss(model(inputs), labels)`` backpropagated, the loss's own parameters outside the wrapper, and
    DataLoader workers (``self.loaders``, made by ``micro_batches`` at the first epoch) kept until close().
    """

    def __init__(self, accelerator, module, loss, data, settings: Settings):
        self.accelerator, self.module, self.loss = accelerator, module, loss
        self.data, self.settings = data, settings
        self.loaders: EpochLoaders | None = None

    def prepare(self, optimizer):
        """``(model, optimizer)`` wrapped by accelerate; the model is what ``forward_backward`` calls."""
        self.model, optimizer = self.accelerator.prepare(self.module, optimizer)
        return self.model, optimizer

    def outside_parameters(self) -> list:
        """Trainable parameters outside the DDP wrapper: their gradients are averaged by hand."""
        return list(self.loss.parameters())

    def forward_backward(self, inputs, labels: torch.Tensor) -> torch.Tensor:
        loss = self.loss(self.model(inputs), labels)
        self.accelerator.backward(loss)
        return loss.detach()

    def close(self) -> None:
        """Stop the DataLoader workers (kept alive between epochs)."""
        if self.loaders is not None:
            self.loaders.close()

    def decoded_batches(
        self, epoch: int, batches: list[list[int]], first: int, *, at_least: int, refusal: str
    ):
        """The batches of ``epoch`` from ``first`` on, each item that failed to decode logged; a batch with
        fewer than ``at_least`` items left is the error ``refusal``."""
        loader = self.loaders.epoch(batches, epoch, first)
        for batch in _without_worker_tracebacks(loader, keep_workers=True):
            for bad in batch.bad:
                log(f"[yellow]skipped:[/] {bad.message}")
            if len(batch.indices) < at_least:
                raise VembedError(refusal)
            yield batch


class PixelSteps(ModelSteps):
    """Images through the (accelerate-wrapped) embedder."""

    def micro_batches(self, epoch: int, batches: list[list[int]], first: int) -> Iterator[tuple]:
        """``(inputs, labels)`` on the device for ``batches[first:]`` of ``epoch``."""
        if self.loaders is None:
            self.loaders = train_loaders(self.data.records, spec=self.module.spec, settings=self.settings)
        device = self.accelerator.device
        for batch in self.loaders.epoch(batches, epoch, first):
            for bad in batch.bad:
                log(f"[yellow]skipped:[/] {bad.message}")
            if not len(batch.indices):
                raise VembedError("every image of a training batch failed to decode (see the lines above)")
            labels = torch.tensor([self.data.labels[i] for i in batch.indices.tolist()], dtype=torch.long)
            yield batch.pixel_values.to(device, non_blocking=True), labels.to(device)


class GradCacheSteps(PixelSteps):
    """Pixels through the gradient cache: chunks of ``train.grad_cache_chunk`` images, same gradients."""

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        chunk = self.settings.train.grad_cache_chunk
        if chunk >= len(inputs):
            return super().forward_backward(inputs, labels)
        acc = self.accelerator
        return grad_cache_backward(
            self.model,
            inputs,
            labels,
            self.loss,
            chunk_size=chunk,
            backward=acc.backward,
            no_sync=lambda: acc.no_sync(self.model),
        )


class CachedFeatureSteps:
    """The head on backbone features computed once (:func:`cache_features`); nothing is DDP-wrapped."""

    def __init__(self, accelerator, embedder, loss, features: torch.Tensor, labels: list[int]):
        self.accelerator, self.embedder, self.loss = accelerator, embedder, loss
        self.features, self.labels = features, torch.tensor(labels, dtype=torch.long)

    def prepare(self, optimizer):
        self.model = self.embedder
        return self.model, self.accelerator.prepare(optimizer)

    def outside_parameters(self) -> list:
        return list(self.loss.parameters()) + [p for p in self.embedder.parameters() if p.requires_grad]

    def micro_batches(self, epoch: int, batches: list[list[int]], first: int) -> Iterator[tuple]:
        device = self.accelerator.device
        for indices in batches[first:]:
            idx = torch.tensor(indices, dtype=torch.long)
            yield self.features[idx].to(device), self.labels[idx].to(device)

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            loss = self.loss(self.embedder.head(inputs), labels)
        self.accelerator.backward(loss)
        return loss.detach()

    def close(self) -> None:
        """Nothing to stop: the features are in memory."""


def uses_feature_cache(settings: Settings) -> bool:
    return settings.train.method == "frozen" and settings.train.cache_features


def step_runner(accelerator, embedder, loss, data: LabelledImages, settings: Settings, features=None):
    """The runner for these settings (``features``: the training features of :func:`cache_features`)."""
    if features is not None:
        return CachedFeatureSteps(accelerator, embedder, loss, features, data.labels)
    if settings.train.grad_cache_chunk:
        return GradCacheSteps(accelerator, embedder, loss, data, settings)
    return PixelSteps(accelerator, embedder, loss, data, settings)


def cache_features(
    accelerator,
    embedder,
    data: LabelledImages,
    val: LabelledImages | None,
    settings: Settings,
    *,
    show_progress: bool,
):
    """Pooled backbone features of the training (and validation) records, computed once.

    Returns ``(data, features, val_features)``: ``data`` without the records that failed to decode, and
    ``val_features`` = ``(embeddings, indices)`` or None without validation data.
    """
    options = embed_options(settings, show_progress=show_progress)
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), accelerator.autocast():
        cached = embed_records(embedder, data.records, options, pooled=True, description="caching features")
        if cached.problems:
            data = data.subset(cached.indices)
        if val is None:
            return data, cached.embeddings, None
        found = embed_records(
            embedder, val.records, options, pooled=True, description="caching validation features"
        )
    return data, cached.embeddings, (found.embeddings, found.indices)
