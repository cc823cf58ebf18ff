"""Gradient cache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

A contrastive loss needs the whole batch's embeddings at once, but not the whole batch's activations:

1. embed the batch chunk by chunk without gradients (activations of one chunk alive at a time);
2. compute the loss on the concatenated embeddings and backpropagate it to the embeddings only;
3. re-run each chunk with gradients and backpropagate the cached embedding gradients through it.

Each chunk's random state (dropout) is recorded in step 1 and replayed in step 3, so the gradients are
those of the full-batch step, for one extra forward pass per chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor


class _RandomState:
    """The CPU and CUDA generator states at one moment, to be replayed."""

    def __init__(self, device: torch.device):
        self.devices = [device] if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for d, state in zip(self.devices, self.cuda, strict=True):
                torch.cuda.set_rng_state(state, d)
            yield


def grad_cache_backward(
    model: Callable[[Tensor], Tensor],
    pixels: Tensor,
    labels: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    chunk_size: int,
    backward: Callable[[Tensor], None],
    no_sync: Callable[[], contextlib.AbstractContextManager],
) -> Tensor:
    """One micro-batch's forward and backward through the gradient cache; returns the (detached) loss.

    ``backward(loss)`` backpropagates the loss (``accelerator.backward``: loss scaling and accumulation);
    ``no_sync()`` keeps DDP from all-reducing after every chunk but the last.
    """
    chunks = pixels.split(chunk_size)
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_RandomState(chunk.device))
            cached.append(model(chunk))
    embeddings = torch.cat(cached).detach().requires_grad_(True)
    loss = loss_fn(embeddings, labels)
    backward(loss)
    grads = embeddings.grad.split(chunk_size)
    for i, (chunk, state, grad) in enumerate(zip(chunks, states, grads, strict=True)):
        sync = contextlib.nullcontext() if i == len(chunks) - 1 else no_sync()
        with sync, state.replay():
            model(chunk).backward(grad.to(pixels.device))
    return loss.detach()
