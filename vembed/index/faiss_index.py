"""Approximate (and flat) faiss indexes over a store's embeddings, by inner product, saved in the store.

``flat`` is exact (faiss's brute force); ``hnsw`` is a graph index, fast to query and needing no
training; ``ivf`` clusters the vectors and visits ``nprobe`` clusters per query; ``ivfpq`` also
compresses each vector to ``pq_m`` codes of ``pq_nbits`` bits (optionally after an OPQ rotation), the
smallest in memory, and re-scores its best ``k·rerank`` candidates (at least 256) exactly from the
store's vectors. On a small store IVF-PQ lowers ``pq_nbits`` to what the store can train (at least 16
codes, else it is refused with the reason).
IVF kinds train on a sample; every kind is built shard by shard (:func:`build_store_index`), and IVF
kinds can be memory-mapped from disk (``index.mmap``). With faiss-gpu installed and a GPU visible, the
IVF clustering runs on the GPU. Scores are inner products, i.e. cosine similarities for normalised
embeddings, like exact search.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
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
KINDS = ("flat", "hnsw", "ivf", "ivfpq")
IVF_KINDS = ("ivf", "ivfpq")
_ADD_CHUNK = 16_384  # vectors added per step (one progress-bar tick)
_RERANK_CHUNK = 1024  # queries re-scored at once (their candidates' vectors are gathered)
_TRAIN_POINTS_PER_LIST = 64  # IVF: training sample size per cluster
_MIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per cluster
MIN_RERANK_DEPTH = 256  # IVF-PQ re-scores at least this many candidates per query (index.rerank)


@dataclass
class FaissIndex:
    """A faiss index and how it was built (``info`` is what ``index.json`` holds)."""

    index: Any  # faiss.Index
    info: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.info["kind"]

    def search(self, queries: np.ndarray, k: int, settings: IndexSettings | None = None, vectors=None):
        """``(scores [Nq, k] float32, indices [Nq, k] int64)``; missing neighbours have index -1.

        ``vectors`` (the store's ``[N, D]`` embeddings) lets ``ivfpq`` re-score its candidates exactly.
        """
        import faiss

        settings = settings or IndexSettings()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(settings.ef_search, k)
        elif self.kind in IVF_KINDS:
            ivf = faiss.extract_index_ivf(self.index)
            ivf.nprobe = min(settings.nprobe, ivf.nlist)
        if self.kind != "ivfpq" or settings.rerank == 0 or vectors is None:
            return self.index.search(queries, k)
        found, depth = [], rerank_depth(k, settings.rerank, self.index.ntotal)
        for start in range(0, len(queries), _RERANK_CHUNK):
            block = queries[start : start + _RERANK_CHUNK]
            _, candidates = self.index.search(block, depth)
            found.append(rerank(block, candidates, vectors, k))
        return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def rerank_depth(k: int, rerank: int, count: int) -> int:
    """Candidates re-scored per query: ``k·rerank``, but at least :data:`MIN_RERANK_DEPTH` (a small
    ``k`` would otherwise trust the compressed codes' order), and at most the index's size."""
    return max(k, min(max(k * rerank, MIN_RERANK_DEPTH), count))


def rerank(queries: np.ndarray, candidates: np.ndarray, vectors, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidate rows of ``vectors``; the best ``k``."""
    vectors = vectors.numpy() if hasattr(vectors, "numpy") else vectors
    rows = np.where(candidates < 0, 0, candidates)
    scores = np.einsum("qd,qcd->qc", queries, np.asarray(vectors[rows.ravel()]).reshape(*rows.shape, -1))
    scores[candidates < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    found = np.take_along_axis(candidates, order, axis=1)
    return best, np.where(np.isfinite(best), found, -1)


def build_index(
    embeddings, kind: str = "hnsw", settings: IndexSettings | None = None, *, show_progress: bool = True
) -> FaissIndex:
    """Build a ``flat``, ``hnsw``, ``ivf`` or ``ivfpq`` inner-product index over ``embeddings`` ``[N, D]``."""
    vectors = _as_float32(embeddings)
    n = len(vectors)
    chunks = ((start, vectors[start : start + _ADD_CHUNK]) for start in range(0, n, _ADD_CHUNK))
    return build_from_chunks(
        n, vectors.shape[1], lambda rows: vectors[rows], chunks, kind, settings, show_progress=show_progress
    )


def build_store_index(
    store_dir: str | Path,
    kind: str = "hnsw",
    settings: IndexSettings | None = None,
    *,
    show_progress: bool = True,
) -> FaissIndex:
    """Build an index over a (sharded) store from its memory-mapped shards, never all in RAM at once."""
    from vembed.index.vectors import StoreVectors

    vectors = StoreVectors(store_dir)
    chunks = zip(vectors.starts[:-1].tolist(), vectors.shard_arrays, strict=True)
    n, dim = vectors.shape
    return build_from_chunks(n, dim, vectors.__getitem__, chunks, kind, settings, show_progress=show_progress)


def measure_index(
    store_dir: str | Path,
    index: FaissIndex,
    settings: IndexSettings | None = None,
    *,
    sample: int = 1000,
    k: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Recall@k of ``index`` against exact search, and both their queries per second, for ``sample``
    of the store's own vectors as queries (searched in one batch)."""
    import time

    from vembed.index.vectors import StoreVectors, exact_topk

    vectors = StoreVectors(store_dir)
    n = len(vectors)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    queries = vectors[rows]
    k = min(k, n)
    start = time.perf_counter()
    _, exact = exact_topk(store_dir, queries, k, chunk_size=(settings or IndexSettings()).chunk_size)
    exact_seconds = time.perf_counter() - start
    start = time.perf_counter()
    _, found = index.search(queries, k, settings, vectors=vectors)
    seconds = time.perf_counter() - start
    hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist(), strict=True))
    return {
        f"recall@{k}": round(hits / (len(rows) * k), 4),
        "qps": round(len(rows) / seconds, 1),
        "exact_qps": round(len(rows) / exact_seconds, 1),
        "speedup": round(exact_seconds / seconds, 2),
        "queries": len(rows),
    }


def build_from_chunks(
    n: int,
    dim: int,
    sample: Callable[[np.ndarray], np.ndarray],
    chunks: Iterable[tuple[int, np.ndarray]],
    kind: str,
    settings: IndexSettings | None = None,
    *,
    show_progress: bool = True,
) -> FaissIndex:
    """The index over ``n`` vectors given as ``(start, [rows, dim])`` chunks in order; ``sample(rows)``
    returns the given rows (sorted indices) for training."""
    import faiss

    settings = settings or IndexSettings()
    if kind not in KINDS:
        raise VembedError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
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
        index = _trained_ivf(n, dim, sample, kind, settings, info)
    with progress(enabled=show_progress) as bar:
        task = bar.add_task(f"building {kind} index", total=n, visible=show_progress)
        for start, vectors in chunks:
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            for offset in range(0, len(vectors), _ADD_CHUNK):
                index.add(vectors[offset : offset + _ADD_CHUNK])
            bar.update(task, completed=start + len(vectors))
    if index.ntotal != n:
        raise VembedError(f"the store gave {index.ntotal} vectors, its meta.json says {n}")
    info["built"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return FaissIndex(index, info)


def _trained_ivf(n: int, dim: int, sample, kind: str, settings: IndexSettings, info: dict) -> Any:
    """An IVF / IVF-PQ (optionally OPQ) index trained on a sample of the vectors."""
    import faiss

    nlist = settings.nlist or max(1, min(round(4 * math.sqrt(n)), n // _MIN_POINTS_PER_LIST))
    if nlist > n:
        raise VembedError(f"index.nlist={nlist} is larger than the store ({n} vectors); lower it")
    if kind == "ivf":
        description = f"IVF{nlist},Flat"
        wanted = nlist * _TRAIN_POINTS_PER_LIST
    else:
        m = settings.pq_m or _default_pq_m(dim)
        if dim % m:
            raise VembedError(f"index.pq_m={m} must divide the embedding dim {dim}")
        nbits = _pq_nbits(n, settings)
        description = f"{f'OPQ{m},' if settings.opq else ''}IVF{nlist},PQ{m}x{nbits}"
        wanted = max(nlist, 2**nbits) * _TRAIN_POINTS_PER_LIST  # PQ codebooks want >= 39 points per code too
        info.update(pq_m=m, pq_nbits=nbits, opq=settings.opq, rerank=settings.rerank)
    index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    keep = None
    if kind == "ivfpq":
        ivf.do_polysemous_training = False  # the factory's default; vembed never searches by Hamming distance
        if settings.opq:  # OPQ learns its rotation with codebooks of the index's own size (not always 8 bits)
            keep = faiss.ProductQuantizer(dim, info["pq_m"], info["pq_nbits"])
            faiss.downcast_VectorTransform(index.chain.at(0)).pq = keep
    # faiss prints a raw "WARNING clustering N points to K centroids" below 39 points per centroid; the
    # sizes above are chosen to fit the store, and the line below says when the sample is thin
    ivf.cp.min_points_per_centroid = 1
    if kind == "ivfpq":
        ivf.pq.cp.min_points_per_centroid = 1
        if keep is not None:
            keep.cp.min_points_per_centroid = 1
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"):
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))  # k-means on the GPU
        info["trained_on"] = "gpu"
    size = min(n, settings.train_size or wanted)
    rows = np.arange(n) if size == n else np.sort(np.random.default_rng(0).choice(n, size, replace=False))
    centroids = max(nlist, 2 ** info["pq_nbits"]) if kind == "ivfpq" else nlist
    thin = (
        f" (under {_MIN_POINTS_PER_LIST} per centroid of {centroids}: fine for a small store, recall may be lower)"
        if size < centroids * _MIN_POINTS_PER_LIST
        else ""
    )
    log(f"training {description} on {size} of {n} vectors{thin}")
    try:
        index.train(np.ascontiguousarray(sample(rows), dtype=np.float32))
    except RuntimeError as exc:  # a size faiss refuses that the checks above did not foresee
        first = (str(exc).strip().splitlines() or ["training failed"])[-1]
        raise VembedError(f"cannot train the {kind} index {description} on {size} vectors: {first}") from None
    del keep  # (referenced by the OPQ matrix until training is done)
    info.update(nlist=nlist, factory=description, train_size=size)
    return index


_MIN_PQ_NBITS = 4  # 16 codes per sub-quantizer: below that, product quantization loses too much


def _pq_nbits(n: int, settings: IndexSettings) -> int:
    """Bits per PQ code: ``index.pq_nbits``, lowered (when not set explicitly) so that the store has at
    least one training vector per code (faiss's hard limit); refused when even 16 codes do not fit."""
    nbits = settings.pq_nbits
    if 2**nbits <= n:
        return nbits
    fit = max(n.bit_length() - 1, 0)  # the largest b with 2**b <= n
    if "pq_nbits" in settings.model_fields_set or fit < _MIN_PQ_NBITS:
        raise VembedError(
            f"a store of {n} vectors is too small for ivfpq with {2**nbits} codes per sub-quantizer "
            f"(index.pq_nbits={nbits} needs at least {2**nbits} vectors to train); "
            + (
                f"set index.pq_nbits={fit} (--nbits {fit}) or lower, or use --kind flat / hnsw"
                if fit >= 1
                else "use --kind flat (exact) or hnsw"
            )
        )
    log(
        f"index.pq_nbits={fit} instead of {nbits}: {n} vectors train at most {2**fit} codes per sub-quantizer"
    )
    return fit


def _default_pq_m(dim: int) -> int:
    """The divisor of ``dim`` nearest ``dim / 4`` (4 dims per byte-sized code: 16x smaller than float32)."""
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - dim / 4), m))


def save_index(faiss_index: FaissIndex, store_dir: str | Path) -> Path:
    """Write ``index.faiss`` and ``index.json`` into the store folder (each atomically)."""
    import faiss

    store_dir = Path(store_dir)
    with atomic_path(store_dir / INDEX_FILE) as tmp:
        faiss.write_index(faiss_index.index, str(tmp))
    write_json(store_dir / INDEX_INFO_FILE, faiss_index.info)
    return store_dir / INDEX_FILE


def load_index(store_dir: str | Path, *, count: int, dim: int, mmap: bool = False) -> FaissIndex | None:
    """The index saved in the store, or ``None``; one that does not match the store is an error.

    ``mmap`` maps an IVF index's lists from disk instead of reading them into memory.
    """
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
    if info.get("kind") not in KINDS:
        raise VembedError(f"{info_file}: unknown index kind {info.get('kind')!r}; {rebuild}")
    flags = faiss.IO_FLAG_MMAP if mmap and info["kind"] in IVF_KINDS else 0
    try:
        index = faiss.read_index(str(index_file), flags)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise VembedError(f"{index_file}: cannot read the faiss index ({first}); {rebuild}") from None
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


def check_index_kind(kind: str) -> str:
    """A faiss index kind to build (``auto`` means hnsw)."""
    kind = "hnsw" if kind == "auto" else kind
    if kind not in KINDS:
        hint = " (exact search needs no index)" if kind == "exact" else ""
        raise VembedError(f"index kind {kind!r}: choose one of {', '.join(KINDS)}{hint}")
    return kind
