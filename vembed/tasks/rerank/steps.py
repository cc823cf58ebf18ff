"""How a batch of mined pairs becomes gradients: both images decoded (and augmented, seeded per draw)
in workers, put side by side, one logit each through the pairwise model, BCE against same/different."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vembed.console import log
from vembed.data.datasets import ImageDataset
from vembed.data.records import ImageRecord
from vembed.errors import VembedError
from vembed.inference import _without_worker_tracebacks
from vembed.models.pairwise import PairwiseModel
from vembed.rerank import PairImages
from vembed.settings import Settings
from vembed.training.data import EpochLoaders, train_transform


@dataclass
class PairSet:
    """The training pairs: ``records`` are ``(a, b, same)`` positions into ``images``."""

    records: list[tuple[int, int, int]]
    images: list[ImageRecord]

    @property
    def positives(self) -> int:
        return sum(same for _, _, same in self.records)


class PairSteps:
    """Side-by-side pair batches through the (accelerate-wrapped) pairwise model; ``loss(logits, same)``."""

    def __init__(self, accelerator, model: PairwiseModel, loss, data: PairSet, settings: Settings):
        self.accelerator, self.pairwise, self.loss = accelerator, model, loss
        self.data, self.settings = data, settings
        self.targets = torch.tensor([same for _, _, same in data.records], dtype=torch.float32)
        self.loaders: EpochLoaders | None = None

    def prepare(self, optimizer):
        self.model, optimizer = self.accelerator.prepare(self.pairwise, optimizer)
        return self.model, optimizer

    def outside_parameters(self) -> list:
        return list(self.loss.parameters())

    def micro_batches(self, epoch: int, batches: list[list[int]], first: int) -> Iterator[tuple]:
        if self.loaders is None:
            images = ImageDataset(
                self.data.images,
                train_transform(self.pairwise.spec, self.settings.train),
                skip_bad=self.settings.data.skip_bad,
                max_pixels=self.settings.data.max_image_pixels,
            )
            pairs = [(a, b) for a, b, _ in self.data.records]
            self.loaders = EpochLoaders(
                PairImages(images, pairs),
                num_workers=self.settings.data.num_workers,
                seed=self.settings.train.seed,
            )
        device = self.accelerator.device
        loader = self.loaders.epoch(batches, epoch, first)
        for batch in _without_worker_tracebacks(loader, keep_workers=True):
            for bad in batch.bad:
                log(f"[yellow]skipped:[/] {bad.message}")
            if len(batch.indices) < 1:
                raise VembedError("no pair of a training batch decoded (see the lines above)")
            targets = self.targets[batch.indices].to(device, non_blocking=True)
            yield batch.pixel_values.to(device, non_blocking=True), targets

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs)
        loss = self.loss(logits.float(), labels)
        self.accelerator.backward(loss)
        return loss.detach()

    def close(self) -> None:
        if self.loaders is not None:
            self.loaders.close()
