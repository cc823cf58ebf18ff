"""Dynamic batching: concurrent requests share one forward pass of the model.

Each request submits its images (a ``[n, 3, H, W]`` tensor); one worker task takes the first waiting
request, then keeps collecting for up to ``max_wait_ms`` or until ``max_batch`` images are waiting,
runs the model once on all of them in a single model thread (the event loop stays free to accept
more), and hands each request its own rows back, in order. A request larger than ``max_batch`` is
split into several forward passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch


@dataclass
class BatchStats:
    """What the batcher did so far (``GET /v1/info`` shows it)."""

    batches: int = 0
    images: int = 0
    largest: int = 0
    model_seconds: float = 0.0
    waiting: int = 0  # images submitted and not answered yet

    def to_json(self) -> dict:
        mean = self.images / self.batches if self.batches else 0.0
        return {
            "batches": self.batches,
            "images": self.images,
            "mean_batch": round(mean, 2),
            "largest_batch": self.largest,
            "model_seconds": round(self.model_seconds, 3),
            "waiting": self.waiting,
        }


@dataclass
class _Item:
    pixels: torch.Tensor
    future: asyncio.Future = field(repr=False)


class DynamicBatcher:
    """Batch ``fn(pixels [B, 3, H, W]) -> embeddings [B, D]`` over concurrent :meth:`embed` calls.

    ``max_batch=1`` (or ``max_wait_ms=0`` under no load) runs one request at a time: the baseline the
    bench compares against. Start it with :meth:`start` inside the event loop; :meth:`stop` finishes
    the batch in flight, then fails whatever is still queued.
    """

    def __init__(
        self, fn: Callable[[torch.Tensor], torch.Tensor], *, max_batch: int = 32, max_wait_ms: float = 5
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vembed-model")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="vembed-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))
        self._pool.shutdown(wait=True)

    async def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``pixels`` ``[n, 3, H, W]``, batched with whatever else is waiting."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, len(pixels), self.max_batch):
            future = loop.create_future()
            await self._queue.put(_Item(pixels[start : start + self.max_batch], future))
            futures.append(future)
        self.stats.waiting += len(pixels)
        try:
            parts = await asyncio.gather(*futures)
        finally:
            self.stats.waiting -= len(pixels)
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    async def run(self, fn: Callable, *args):
        """``fn(*args)`` in the model thread (a text tower's forward, never beside an image batch)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _work(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        held: _Item | None = None  # an item that did not fit into the last batch
        while True:
            first = held or await self._queue.get()
            held = None
            items, count = [first], len(first.pixels)
            deadline = loop.time() + self.max_wait
            while count < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                if count + len(item.pixels) > self.max_batch:
                    held = item
                    break
                items.append(item)
                count += len(item.pixels)
            live = [it for it in items if not it.future.cancelled()]  # clients that went away
            if not live:
                continue
            batch = torch.cat([it.pixels for it in live]) if len(live) > 1 else live[0].pixels
            start = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._pool, self.fn, batch)
            except Exception as exc:  # the model failed: every request of this batch hears why
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.images += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            self.stats.model_seconds += time.perf_counter() - start
            row = 0
            for it in live:
                n = len(it.pixels)
                if not it.future.done():
                    it.future.set_result(out[row : row + n])
                row += n
