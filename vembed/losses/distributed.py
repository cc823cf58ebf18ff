"""Gathering embeddings across processes so contrastive losses see every device's batch.

Anchors stay local; the candidates (positives and negatives) come from all ranks. The gather keeps the
autograd graph: torch's functional collective ``all_gather_single`` (``torch.distributed.
_functional_collectives``, differentiable; it replaces the deprecated ``torch.distributed.nn.functional.
all_gather``) has a reduce-scatter (sum) backward, which sums into each rank's local embeddings the
gradients that every rank's loss sends to them. With DDP averaging parameter
gradients over ranks, each rank computing ``loss(local anchors, all candidates)`` then optimises the mean
of the per-rank losses -- the same objective as one big batch.

On a single process (torch.distributed not initialised, or world size 1) everything here is the identity.
All ranks must pass the same batch size (all_gather needs equal shapes; ``PKBatchSampler`` guarantees it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_candidates", "gather_no_grad", "gather_with_grad", "rank_and_world_size"]


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, differentiably (rank order: rank 0 first).

    Identity when torch.distributed is not initialised or the world size is 1.
    """
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    from torch.distributed._functional_collectives import all_gather_single

    return all_gather_single(tensor.contiguous(), 0, dist.group.WORLD)


def gather_no_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (e.g. labels) from every rank along dim 0, without gradients."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def gather_candidates(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, int]:
    """Candidates for local anchors: ``(all embeddings, all labels, offset)``.

    ``offset`` is where this rank's own rows start in the gathered tensors, so local anchor ``i`` is
    candidate column ``offset + i`` (the column a loss must mask as "self").
    """
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return embeddings, labels, 0
    return gather_with_grad(embeddings), gather_no_grad(labels), rank * embeddings.shape[0]


def self_mask(num_anchors: int, num_candidates: int, offset: int, device: torch.device) -> Tensor:
    """Boolean [num_anchors, num_candidates] mask, True at (i, offset + i): each anchor's own column."""
    mask = torch.zeros(num_anchors, num_candidates, dtype=torch.bool, device=device)
    rows = torch.arange(num_anchors, device=device)
    mask[rows, rows + offset] = True
    return mask
