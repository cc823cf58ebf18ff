"""Exact all-vs-all Recall@K / MAP@R split across 2 processes (gloo) against one process, same data.

What splitting buys is memory: each process holds half the embeddings and a half-width score buffer.
Time is compared on the same cores: each of the 2 processes runs the case's torch threads (at least
one), the one-process baseline twice as many. The metrics must be identical (asserted in the note).
"""

from __future__ import annotations

import os
import queue
import time

import torch
import torch.multiprocessing as mp

from bench.common import Figure, Profile, log
from bench.retrieval import KS, make_data

ORDER = 21
PROCESSES = 2


def _worker(rank: int, world: int, port: int, n: int, dim: int, threads: int, results) -> None:
    import torch.distributed as dist

    from vembed.evaluation.sharded_retrieval import sharded_retrieval_metrics

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, labels = make_data(n, dim)
    share = slice(rank * n // world, (rank + 1) * n // world)
    mine = x[share].clone()
    del x
    dist.barrier()
    start = time.perf_counter()
    metrics = sharded_retrieval_metrics(mine, labels[share], ks=KS)
    dist.barrier()
    results.put((rank, metrics, time.perf_counter() - start, mine.numel() * 4))
    dist.destroy_process_group()


def sharded(n: int, dim: int, threads: int) -> tuple[dict, float, int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    args = (PROCESSES, port, n, dim, threads // PROCESSES, results)
    workers = [context.Process(target=_worker, args=(rank, *args)) for rank in range(PROCESSES)]
    for w in workers:
        w.start()
    out = []
    while len(out) < len(workers):
        try:
            out.append(results.get(timeout=5))
        except queue.Empty:
            if any(w.exitcode not in (None, 0) for w in workers):
                for w in workers:
                    w.kill()
                raise RuntimeError("a sharded worker failed (see its traceback above)") from None
    for w in workers:
        w.join()
    return out[0][1], max(o[2] for o in out), max(o[3] for o in out)


def run(profile: Profile) -> list[Figure]:
    from vembed.evaluation.retrieval import retrieval_metrics

    n, dim = profile.retrieval_n, profile.retrieval_dim
    per_process = max(1, torch.get_num_threads())
    threads = per_process * PROCESSES  # the same cores for both
    torch.set_num_threads(threads)
    x, labels = make_data(n, dim)
    log(f"sharded: N={n} dim={dim}, {PROCESSES} processes × {per_process} threads vs 1 × {threads}")
    best_one = best_split = float("inf")
    for _ in range(max(1, profile.repeat - 1)):
        start = time.perf_counter()
        one = retrieval_metrics(x, labels, ks=KS)
        best_one = min(best_one, time.perf_counter() - start)
        split, seconds, held = sharded(n, dim, threads)
        best_split = min(best_split, seconds)
        log(f"  one process {best_one:.1f} s, {PROCESSES} processes {seconds:.1f} s")
    note = "identical metrics" if split == one else "METRICS DIFFER from one process"
    detail = {"embedding_bytes_per_process": held, "embedding_bytes_one_process": x.numel() * 4}
    what = f"exact all-vs-all split over {PROCESSES} processes, {n:,}×{dim}"
    return [
        Figure("sharded", what, best_split, best_one, "one process", "s", higher_is_better=False,
               note=f"{note}; each process holds 1/{PROCESSES} of the embeddings", detail=detail),
    ]  # fmt: skip
