"""How a batch of mined pairs becomes gradients: both images decoded (and augmented, seeded per draw)
in workers, put side by side, one logit each through the pairwise model, BCE against same/different."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vembed.data.records import ImageRecord
from vembed.models.pairwise import PairwiseModel
from vembed.rerank import PairImages
from vembed.settings import Settings
from vembed.training.data import train_loaders
from vembed.training.steps import ModelSteps


@dataclass
class PairSet:
    """The training pairs: ``records`` are ``(a, b, same)`` positions into ``images``."""

    records: list[tuple[int, int, int]]
    images: list[ImageRecord]

    @property
    def positives(self) -> int:
        return sum(same for _, _, same in self.records)


class PairSteps(ModelSteps):
    """Side-by-side pair batches through the (accelerate-wrapped) pairwise model; ``loss(logits, same)``."""

    def __init__(self, accelerator, model: PairwiseModel, loss, data: PairSet, settings: Settings):
        super().__init__(accelerator, model, loss, data, settings)
        self.targets = torch.tensor([same for _, _, same in data.records], dtype=torch.float32)

    def micro_batches(self, epoch: int, batches: list[list[int]], first: int) -> Iterator[tuple]:
        if self.loaders is None:
            pairs = [(a, b) for a, b, _ in self.data.records]
            self.loaders = train_loaders(
                self.data.images,
                spec=self.module.spec,
                settings=self.settings,
                items=lambda images: PairImages(images, pairs),
            )
        device = self.accelerator.device
        refusal = "no pair of a training batch decoded (see the lines above)"
        for batch in self.decoded_batches(epoch, batches, first, at_least=1, refusal=refusal):
            targets = self.targets[batch.indices].to(device, non_blocking=True)
            yield batch.pixel_values.to(device, non_blocking=True), targets

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs)
        loss = self.loss(logits.float(), labels)
        self.accelerator.backward(loss)
        return loss.detach()
