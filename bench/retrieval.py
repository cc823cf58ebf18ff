"""All-vs-all Recall@K / MAP@R (retrieval_metrics) against faiss flat search and a chunked matmul + topk.

Data: N random L2-normalised vectors around N/5 random class centres (SOP-like: ~5 images per class,
metrics neither 0 nor 1), K up to 1000. Baselines, timed in the same process on the same data:

- faiss flat: ``IndexFlatIP.search(x, max(K) + 1)`` (self dropped afterwards) plus the same Recall@K
  from its neighbour lists: the target is vembed within 1.1× of it (ratio ≥ 0.91);
- chunked torch: ``x[chunk] @ x.T`` then ``topk`` per chunk of 4096 queries (no tie handling).

vembed must give the same Recall@K as faiss (it is exact; faiss too, up to float ties).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.common import Figure, Profile, log

ORDER = 20
KS = (1, 10, 100, 1000)


def make_data(n: int, dim: int, per_class: int = 5, noise: float = 2.5, seed: int = 0):
    """Clustered unit vectors and their labels, built in place (no N×dim temporaries)."""
    gen = torch.Generator().manual_seed(seed)
    num_classes = max(1, round(n / per_class))
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    centres = torch.randn(num_classes, dim, generator=gen)
    x = torch.randn(n, dim, generator=gen).mul_(noise)
    for start in range(0, n, 8192):
        x[start : start + 8192] += centres[labels[start : start + 8192]]
    x.div_(x.norm(dim=1, keepdim=True))
    return x, labels


def recall_from_neighbours(neighbours: np.ndarray, labels: np.ndarray, ks=KS) -> dict[str, float]:
    """Recall@K from ``[N, >=max(K)]`` neighbour lists (self already removed), queries with a match only."""
    relevant = labels[neighbours] == labels[:, None]
    counts = np.bincount(labels)
    used = counts[labels] > 1
    return {f"recall@{k}": float(relevant[used, :k].any(axis=1).mean()) for k in ks}


def faiss_flat(x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    import faiss

    data = np.ascontiguousarray(x.numpy())
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    _, found = index.search(data, max(KS) + 1)
    own = found == np.arange(len(data))[:, None]
    # drop self from each row (it is first unless a duplicate ties with it), keep max(K) neighbours
    keep = np.where(own.any(axis=1, keepdims=True), ~own, np.arange(found.shape[1]) < max(KS))
    neighbours = found[keep].reshape(len(data), max(KS))
    return recall_from_neighbours(neighbours, labels.numpy())


def chunked_topk(x: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    found = []
    for start in range(0, len(x), chunk):
        scores = x[start : start + chunk] @ x.T
        scores[torch.arange(len(scores)), torch.arange(start, start + len(scores))] = float("-inf")
        found.append(torch.topk(scores, max(KS), dim=1).indices)
    return recall_from_neighbours(torch.cat(found).numpy(), labels.numpy())


def run(profile: Profile) -> list[Figure]:
    from vembed.evaluation.retrieval import retrieval_metrics

    n, dim = profile.retrieval_n, profile.retrieval_dim
    x, labels = make_data(n, dim)
    log(f"retrieval: N={n} dim={dim}, K={KS}, {torch.get_num_threads()} threads")
    timings: dict[str, float] = {}
    results: dict[str, dict] = {}
    methods = {
        "vembed": lambda: retrieval_metrics(x, labels, ks=KS),
        "faiss": lambda: faiss_flat(x, labels),
        "chunked": lambda: chunked_topk(x, labels),
    }
    if n > 20_000:  # the chunked baseline only shows the top-K cost; skip it where a run takes minutes
        del methods["chunked"]
    for _ in range(max(1, profile.repeat - 1)):  # interleaved, so drifting load hits every method
        for name, fn in methods.items():
            start = time.perf_counter()
            results[name] = fn()
            timings[name] = min(timings.get(name, float("inf")), time.perf_counter() - start)
            log(f"  {name}: {time.perf_counter() - start:.1f} s")
    same = all(abs(results["vembed"][k] - results["faiss"][k]) < 1e-4 for k in results["faiss"])
    what = f"all-vs-all Recall@K, {n:,}×{dim}, K≤{max(KS)}"
    note = "same recall as faiss" if same else "RECALL DIFFERS from faiss"
    figures = [
        Figure("retrieval", what, timings["vembed"], timings["faiss"], "faiss flat", "s",
               higher_is_better=False, target=1 / 1.1, note=note, detail={"recall": results}),
    ]  # fmt: skip
    if "chunked" in timings:
        figures.append(Figure("retrieval", what, timings["vembed"], timings["chunked"], "torch matmul+topk",
                              "s", higher_is_better=False))  # fmt: skip
    return figures
