"""A store's vectors as one memory-mapped array over its shards, and exact top-k shard by shard.

The shards' safetensors files are mapped, not read: re-scoring IVF-PQ candidates, sampling training
vectors or measuring recall touches only the rows it needs, whatever the store's size.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from vembed.errors import VembedError
from vembed.index.store import Shard, read_store_meta, store_shards
from vembed.neighbours import topk


class StoreVectors:
    """The ``[N, D]`` float32 rows of a store, concatenated over its shards, memory-mapped.

    ``vectors[rows]`` (an integer array) gathers rows; ``vectors.shard_arrays`` are the per-shard maps.
    """

    def __init__(self, store_dir: str | Path):
        meta = read_store_meta(store_dir)
        self.shard_arrays = [_map_embeddings(shard) for shard in store_shards(store_dir, meta)]
        self.starts = np.cumsum([0, *(len(a) for a in self.shard_arrays)])
        self.dim = int(self.shard_arrays[0].shape[1]) if self.shard_arrays else int(meta.get("dim", 0))

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.starts[-1]), self.dim

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.ravel()
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"row out of range for a store of {len(self)} vectors")
        out = np.empty((len(flat), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self.starts, flat, side="right") - 1
        for s in np.unique(shard_of):
            mine = shard_of == s
            out[mine] = self.shard_arrays[s][flat[mine] - self.starts[s]]
        return out.reshape(*rows.shape, self.dim)


def exact_topk(
    store_dir: str | Path, queries, k: int, *, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(scores, indices)`` ``[Nq, k]`` over every shard, one shard in memory at a time."""
    vectors = StoreVectors(store_dir)
    queries = torch.as_tensor(np.asarray(queries), dtype=torch.float32)
    best_scores, best_indices = None, None
    for start, array in zip(vectors.starts[:-1].tolist(), vectors.shard_arrays, strict=True):
        scores, indices = topk(
            queries, torch.from_numpy(np.array(array)), min(k, len(array)), chunk_size=chunk_size
        )
        indices = indices + start
        if best_scores is not None:
            scores, indices = torch.cat([best_scores, scores], 1), torch.cat([best_indices, indices], 1)
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
            scores, indices = scores.gather(1, order), indices.gather(1, order)
        best_scores, best_indices = scores, indices
    return best_scores, best_indices


def _map_embeddings(shard: Shard) -> np.ndarray:
    """The ``embeddings`` tensor of a safetensors file as a read-only ``np.memmap``."""
    path = shard.embeddings
    if not path.is_file():
        raise VembedError(f"{path}: missing (the store is incomplete)")
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise VembedError(f"{path}: not a safetensors file") from None
    entry = header.get("embeddings")
    if not entry or entry.get("dtype") != "F32" or len(entry.get("shape", [])) != 2:
        raise VembedError(f"{path}: no 2-D float32 'embeddings' tensor")
    rows, dim = entry["shape"]
    begin, _ = entry["data_offsets"]
    if rows == 0:
        return np.empty((0, dim), dtype=np.float32)
    return np.memmap(path, dtype="<f4", mode="r", offset=8 + length + begin, shape=(rows, dim))


def write_vector_store(path: str | Path, chunks, *, labels=None) -> Path:
    """A store of plain vectors (no model: benchmarks, tests, vectors made elsewhere), one shard per
    ``[n, D]`` chunk; row ``i`` is named ``vector-i`` (``labels``: optional per-row labels)."""
    from safetensors.numpy import save_file

    from vembed.index.store import META_FILE, STORE_FORMAT, STORE_VERSION, is_store
    from vembed.io import atomic_dir, atomic_path, write_json, write_jsonl

    path = Path(path)
    if path.exists() and not is_store(path):
        raise VembedError(f"{path} exists and is not a vembed store; refusing to replace it")
    entries, start, dim = [], 0, None
    with atomic_dir(path) as tmp:
        (tmp / "shards").mkdir()
        for number, chunk in enumerate(chunks):
            chunk = np.ascontiguousarray(chunk, dtype=np.float32)
            dim = chunk.shape[1]
            stem = f"shards/p000-{number:06d}"
            with atomic_path(tmp / f"{stem}.safetensors") as file:
                save_file({"embeddings": chunk}, str(file), metadata={"format": STORE_FORMAT})
            rows = range(start, start + len(chunk))
            write_jsonl(
                tmp / f"{stem}.jsonl",
                (
                    {"path": f"vector-{i}", "label": None if labels is None else labels[i], "category": None}
                    for i in rows
                ),
            )
            entries.append(
                {"embeddings": f"{stem}.safetensors", "manifest": f"{stem}.jsonl", "count": len(chunk)}
            )
            start += len(chunk)
        meta = {"format": STORE_FORMAT, "format_version": STORE_VERSION, "count": start, "dim": dim}
        write_json(tmp / META_FILE, {**meta, "dtype": "float32", "model": {}, "shards": entries})
    return path
