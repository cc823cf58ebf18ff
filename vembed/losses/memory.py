"""Cross-batch memory (XBM, Wang et al. 2020, "Cross-Batch Memory for Embedding Learning").

A ring buffer of the last ``size`` training embeddings (L2-normalised, detached) with their labels. A
pair loss that has one (``loss.memory``, set by ``build_loss(..., memory_bank=N)`` / ``train.memory_bank``)
uses its entries as extra candidates — positives and negatives of the batch's anchors, without gradient —
and then adds the batch to it. Embeddings drift slowly once training settles, which is what makes old
ones useful negatives (XBM starts the memory after a warm-up; here it fills from the first step).

- Several processes: every rank adds the embeddings of every rank (an all-gather), so all ranks hold the
  same memory and compute the loss over the same candidates.
- Gradient cache: the loss runs once per micro-batch on the whole micro-batch's embeddings, so the
  memory sees each image once.
- Checkpoints: the buffers are the loss's ``state_dict`` (``loss.memory.*``), so a resumed run continues
  with exactly the memory it stopped with. Only a loss in training mode adds to it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vembed.errors import VembedError
from vembed.losses._common import check_batch, float32_forward, normalize, zero_with_grad
from vembed.losses.distributed import gather_candidates, gather_no_grad, self_mask

__all__ = ["MemoryBank", "with_memory"]


class MemoryBank(nn.Module):
    """The last ``size`` embeddings and labels (a FIFO ring buffer, float32)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise VembedError(f"train.memory_bank must be a positive number of embeddings, got {size!r}")
        self.size = size
        self.register_buffer("embeddings", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))

    def entries(self) -> tuple[Tensor, Tensor]:
        """``(embeddings [M, D], labels [M])`` held now (M <= size)."""
        count = int(self.filled)
        return self.embeddings[:count], self.labels[:count]

    @torch.no_grad()
    def add(self, embeddings: Tensor, labels: Tensor) -> None:
        """Add this rank's batch (and, on several processes, every rank's), oldest entries first out."""
        embeddings = gather_no_grad(embeddings.detach().float().contiguous())
        labels = gather_no_grad(labels.detach().long().contiguous())
        embeddings, labels = embeddings[-self.size :], labels[-self.size :]
        n = embeddings.shape[0]
        slots = (int(self.position) + torch.arange(n, device=self.embeddings.device)) % self.size
        self.embeddings[slots] = embeddings.to(self.embeddings.device)
        self.labels[slots] = labels.to(self.labels.device)
        self.position.fill_((int(self.position) + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.embeddings.shape[1]}"


def with_memory(loss: nn.Module, candidates: Tensor, candidate_labels: Tensor) -> tuple[Tensor, Tensor]:
    """The batch's candidates followed by ``loss.memory``'s entries (none without a memory)."""
    memory = getattr(loss, "memory", None)
    if memory is None or int(memory.filled) == 0:
        return candidates, candidate_labels
    stored, stored_labels = memory.entries()
    return (
        torch.cat([candidates, stored.to(candidates.device, candidates.dtype)]),
        torch.cat([candidate_labels, stored_labels.to(candidate_labels.device)]),
    )


def pair_masks(loss: nn.Module, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(similarities [N, M], positives [N, M], negatives [N, M])`` of the local anchors against every
    candidate (every rank's batch, then ``loss.memory``'s entries).

    Without a miner (``loss.miner``) the positives are every other same-label candidate and the negatives
    every other-label one; with a miner, the pairs it mined.
    """
    anchors = normalize(embeddings)
    candidates, candidate_labels, offset = gather_candidates(anchors, labels)
    candidates, candidate_labels = with_memory(loss, candidates, candidate_labels)
    similarities = anchors @ candidates.T
    own = self_mask(anchors.shape[0], candidates.shape[0], offset, anchors.device)
    same = labels[:, None] == candidate_labels[None, :]
    positives, negatives = same & ~own, ~same
    if loss.miner is not None:
        positives, negatives = loss.miner.pairs(1.0 - similarities.detach(), positives, negatives)
    return similarities, positives, negatives


class PairMaskLoss(nn.Module):
    """An in-batch pair loss: anchors against every candidate (other ranks' batches, the memory),
    mined, through :meth:`from_pairs`; the batch is remembered after. An empty batch gives 0 (with grad)."""

    miner = None

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels, self.name)
        if embeddings.shape[0] == 0:
            return zero_with_grad(embeddings)
        loss = self.from_pairs(*pair_masks(self, embeddings, labels))
        remember(self, normalize(embeddings), labels)
        return loss

    def from_pairs(self, similarities: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        """The loss from :func:`pair_masks`' similarities [N, M] and masks."""
        raise NotImplementedError


def remember(loss: nn.Module, anchors: Tensor, labels: Tensor) -> None:
    """After a training forward: add the batch's (normalised) embeddings to ``loss.memory``."""
    memory = getattr(loss, "memory", None)
    if memory is not None and loss.training:
        memory.add(anchors, labels)
