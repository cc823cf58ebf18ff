"""Approximate (and flat) faiss indexes over a store's embeddings, by inner product, saved in the store.

``flat`` is exact (faiss's brute force); ``hnsw`` is a graph index, fast to query and needing no
training; ``ivf`` clusters the vectors and visits ``nprobe`` clusters per query (smallest memory).
Scores are inner products, i.e. cosine similarities for normalised embeddings, like exact search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vembed.console import log, progress
from vembed.errors import VembedError
from vembed.io import atomic_path, write_json
from vembed.settings import IndexSettings

INDEX_FILE = "index.faiss"
INDEX_INFO_FILE = "index.json"
KINDS = ("flat", "hnsw", "ivf")
_ADD_CHUNK = 16_384  # vectors added per step (one progress-bar tick)
_TRAIN_POINTS_PER_LIST = 64  # IVF: training sample size per cluster
_MIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per cluster


@dataclass
class FaissIndex:
    """A faiss index and how it was built (``info`` is what ``index.json`` holds)."""

    index: Any  # faiss.Index
    info: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.info["kind"]

    def search(self, queries: np.ndarray, k: int, settings: IndexSettings | None = None):
        """``(scores [Nq, k] float32, indices [Nq, k] int64)``; missing neighbours have index -1."""
        settings = settings or IndexSettings()
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(settings.ef_search, k)
        elif self.kind == "ivf":
            self.index.nprobe = min(settings.nprobe, self.index.nlist)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def build_index(
    embeddings, kind: str = "hnsw", settings: IndexSettings | None = None, *, show_progress: bool = True
) -> FaissIndex:
    """Build a ``flat``, ``hnsw`` or ``ivf`` inner-product index over ``embeddings`` ``[N, D]``."""
    import faiss

    settings = settings or IndexSettings()
    if kind not in KINDS:
        raise VembedError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    vectors = _as_float32(embeddings)
    n, dim = vectors.shape
    if n == 0:
        raise VembedError("cannot build an index over an empty store")
    info: dict[str, Any] = {"kind": kind, "count": n, "dim": dim, "metric": "inner_product"}
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
        info.update(hnsw_m=settings.hnsw_m, ef_construction=settings.ef_construction)
    else:
        nlist = settings.nlist or max(1, min(round(4 * math.sqrt(n)), n // _MIN_POINTS_PER_LIST))
        if nlist > n:
            raise VembedError(f"index.nlist={nlist} is larger than the store ({n} vectors); lower it")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if not settings.nlist:  # the default nlist already keeps >= 39 points per cluster when it can
            index.cp.min_points_per_centroid = 1
        sample = vectors
        if n > nlist * _TRAIN_POINTS_PER_LIST:
            rows = np.random.default_rng(0).choice(n, nlist * _TRAIN_POINTS_PER_LIST, replace=False)
            sample = vectors[np.sort(rows)]
        log(f"training IVF ({nlist} cluster{'s' if nlist > 1 else ''}) on {len(sample)} vectors")
        index.train(sample)
        info.update(nlist=nlist)
    with progress() as bar:
        task = bar.add_task(f"building {kind} index", total=n, visible=show_progress)
        for start in range(0, n, _ADD_CHUNK):
            index.add(vectors[start : start + _ADD_CHUNK])
            bar.update(task, completed=min(start + _ADD_CHUNK, n))
    info["built"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return FaissIndex(index, info)


def save_index(faiss_index: FaissIndex, store_dir: str | Path) -> Path:
    """Write ``index.faiss`` and ``index.json`` into the store folder (each atomically)."""
    import faiss

    store_dir = Path(store_dir)
    with atomic_path(store_dir / INDEX_FILE) as tmp:
        faiss.write_index(faiss_index.index, str(tmp))
    write_json(store_dir / INDEX_INFO_FILE, faiss_index.info)
    return store_dir / INDEX_FILE


def load_index(store_dir: str | Path, *, count: int, dim: int) -> FaissIndex | None:
    """The index saved in the store, or ``None``; one that does not match the store is an error."""
    import json

    import faiss

    store_dir = Path(store_dir)
    index_file, info_file = store_dir / INDEX_FILE, store_dir / INDEX_INFO_FILE
    if not index_file.is_file():
        return None
    rebuild = f"rebuild it with `vembed index build {store_dir}`"
    if not info_file.is_file():
        raise VembedError(f"{info_file}: missing beside {index_file.name}; {rebuild}")
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise VembedError(f"{info_file}: invalid JSON ({exc.msg} at line {exc.lineno}); {rebuild}") from None
    try:
        index = faiss.read_index(str(index_file))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise VembedError(f"{index_file}: cannot read the faiss index ({first}); {rebuild}") from None
    if info.get("kind") not in KINDS:
        raise VembedError(f"{info_file}: unknown index kind {info.get('kind')!r}; {rebuild}")
    if index.ntotal != count or index.d != dim:
        raise VembedError(
            f"{index_file}: holds {index.ntotal} vectors of dim {index.d}, the store {count} of dim {dim}; {rebuild}"
        )
    return FaissIndex(index, info)


def _as_float32(embeddings) -> np.ndarray:
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().cpu().float().numpy()
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2:
        raise VembedError(f"embeddings must be 2-D [items, dim], got shape {vectors.shape}")
    return vectors
