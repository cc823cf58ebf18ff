"""How a batch of image–caption pairs becomes gradients: images decoded and augmented in workers, one
caption per image drawn per epoch, both towers run through the (accelerate-wrapped) dual encoder."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from vembed.console import log
from vembed.data.captions import CaptionSet
from vembed.data.datasets import ImageDataset
from vembed.errors import VembedError
from vembed.inference import _without_worker_tracebacks
from vembed.models.dual import DualEncoder
from vembed.settings import Settings
from vembed.training.data import AugmentedImages, EpochLoaders, train_transform
from vembed.training.gradcache import grad_cache_backward


def caption_for(captions: tuple[str, ...], *, seed: int, epoch: int, index: int) -> str:
    """The caption image ``index`` is trained with in ``epoch``: a pure function of (seed, epoch, index),
    so a resumed run draws the same ones."""
    if len(captions) == 1:
        return captions[0]
    return captions[random.Random(f"{seed}/{epoch}/{index}/caption").randrange(len(captions))]


class PairSteps:
    """Image + caption batches through the dual encoder; the loss takes ``(image, text)`` embeddings."""

    def __init__(self, accelerator, encoder: DualEncoder, loss, data: CaptionSet, settings: Settings):
        self.accelerator, self.encoder, self.loss = accelerator, encoder, loss
        self.data, self.settings = data, settings
        self.loaders: EpochLoaders | None = None

    def prepare(self, optimizer):
        self.model, optimizer = self.accelerator.prepare(self.encoder, optimizer)
        return self.model, optimizer

    def outside_parameters(self) -> list:
        return list(self.loss.parameters())

    def micro_batches(self, epoch: int, batches: list[list[int]], first: int) -> Iterator[tuple]:
        if self.loaders is None:
            images = ImageDataset(
                self.data.images(),
                train_transform(self.encoder.spec, self.settings.train),
                skip_bad=self.settings.data.skip_bad,
                max_pixels=self.settings.data.max_image_pixels,
            )
            self.loaders = EpochLoaders(
                AugmentedImages(images),
                num_workers=self.settings.data.num_workers,
                seed=self.settings.train.seed,
            )
        device, seed = self.accelerator.device, self.settings.train.seed
        loader = self.loaders.epoch(batches, epoch, first)
        for batch in _without_worker_tracebacks(loader, keep_workers=True):
            for bad in batch.bad:
                log(f"[yellow]skipped:[/] {bad.message}")
            if len(batch.indices) < 2:
                raise VembedError("fewer than 2 images of a training batch decoded (see the lines above)")
            indices = batch.indices.tolist()
            texts = [
                caption_for(self.data.records[i].captions, seed=seed, epoch=epoch, index=i) for i in indices
            ]
            tokens = self.encoder.tokenize(texts)
            inputs = {"pixel_values": batch.pixel_values.to(device, non_blocking=True)}
            inputs.update({k: v.to(device, non_blocking=True) for k, v in tokens.items()})
            yield inputs, batch.indices.to(device)

    def forward_backward(self, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        chunk = self.settings.train.grad_cache_chunk
        if chunk and chunk < len(labels):
            return self._grad_cache(inputs, labels, chunk)
        image, text = self.model(**inputs)
        loss = self.loss(image, text)
        self.accelerator.backward(loss)
        return loss.detach()

    def _grad_cache(self, inputs: dict, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        """The gradient cache over both towers: a chunk of pairs gives ``[image | text]`` rows."""
        acc = self.accelerator

        def embed(rows: torch.Tensor) -> torch.Tensor:
            return torch.cat(self.model(**{k: v[rows] for k, v in inputs.items()}), dim=1)

        def pair_loss(joint: torch.Tensor, _labels) -> torch.Tensor:
            image, text = joint.chunk(2, dim=1)
            return self.loss(image, text)

        rows = torch.arange(len(labels), device=labels.device)
        return grad_cache_backward(
            embed,
            rows,
            labels,
            pair_loss,
            chunk_size=chunk,
            backward=acc.backward,
            no_sync=lambda: acc.no_sync(self.model),
        )

    def close(self) -> None:
        if self.loaders is not None:
            self.loaders.close()
