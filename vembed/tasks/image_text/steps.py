"""How a batch of image–caption pairs becomes gradients: images decoded and augmented in workers, one
caption per image drawn per epoch, both towers run through the (accelerate-wrapped) dual encoder."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from vembed.data.captions import CaptionSet
from vembed.models.dual import DualEncoder
from vembed.training.data import train_loaders
from vembed.training.gradcache import grad_cache_backward
from vembed.training.steps import ModelSteps


def caption_for(captions: tuple[str, ...], *, seed: int, epoch: int, index: int) -> str:
    """The caption image ``index`` is trained with in ``epoch``: a pure function of (seed, epoch, index),
    so a resumed run draws the same ones."""
    if len(captions) == 1:
        return captions[0]
    return captions[random.Random(f"{seed}/{epoch}/{index}/caption").randrange(len(captions))]


class PairSteps(ModelSteps):
    """Image + caption batches through the dual encoder (``module``); the loss takes ``(image, text)``
    embeddings."""

    module: DualEncoder
    data: CaptionSet

    def micro_batches(self, epoch: int, batches: list[list[int]], first: int) -> Iterator[tuple]:
        if self.loaders is None:
            self.loaders = train_loaders(self.data.images(), spec=self.module.spec, settings=self.settings)
        device, seed = self.accelerator.device, self.settings.train.seed
        refusal = "fewer than 2 images of a training batch decoded (see the lines above)"
        for batch in self.decoded_batches(epoch, batches, first, at_least=2, refusal=refusal):
            indices = batch.indices.tolist()
            texts = [
                caption_for(self.data.records[i].captions, seed=seed, epoch=epoch, index=i) for i in indices
            ]
            tokens = self.module.tokenize(texts)
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
