"""A store's rows as Arrow tables, one per shard: ``id``, ``path``, ``label``, ``category``, ``embedding``.

``embedding`` is a fixed-size list of float32 (the store's dim); ``id`` is the row's position in the
store (the primary key Milvus and Qdrant want); ``label`` is int64 when every label is an integer (or
missing), text otherwise. The store's ``meta.json`` travels as schema metadata (``vembed.meta``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vembed.extras import require
from vembed.index.store import read_shard_embeddings, read_shard_rows, read_store_meta, store_shards

META_KEY = b"vembed.meta"


@dataclass(frozen=True)
class StoreLayout:
    """What an export needs to know before it reads any embedding."""

    path: Path
    meta: dict[str, Any]
    count: int
    dim: int
    shards: int
    label_type: str  # "int64" or "string"


def store_layout(path: str | Path) -> StoreLayout:
    """Count, dim and the label column's type, from ``meta.json`` and the manifests (no embeddings)."""
    path = Path(path)
    meta = read_store_meta(path)
    shards = store_shards(path, meta)
    count, numeric = 0, True
    for shard in shards:
        rows = read_shard_rows(shard)
        count += len(rows)
        numeric = numeric and all(_is_int(row.get("label")) or row.get("label") is None for row in rows)
    return StoreLayout(path, meta, count, int(meta["dim"]), len(shards), "int64" if numeric else "string")


def arrow_schema(layout: StoreLayout):
    pa = require("pyarrow", "parquet", what="vembed store export")
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("label", pa.int64() if layout.label_type == "int64" else pa.string()),
            pa.field("category", pa.string()),
            pa.field("embedding", pa.list_(pa.float32(), layout.dim), nullable=False),
        ],
        metadata={META_KEY: json.dumps(layout.meta, ensure_ascii=False, default=str).encode()},
    )


def iter_tables(layout: StoreLayout) -> Iterator:
    """One ``pyarrow.Table`` per shard, in store order (one shard's embeddings in memory at a time)."""
    pa = require("pyarrow", "parquet", what="vembed store export")
    schema = arrow_schema(layout)
    start = 0
    for shard in store_shards(layout.path, layout.meta):
        embeddings = read_shard_embeddings(shard).numpy()
        rows = read_shard_rows(shard)
        n = len(rows)
        labels = [row.get("label") for row in rows]
        if layout.label_type == "string":
            labels = [None if v is None else str(v) for v in labels]
        flat = pa.array(embeddings.reshape(-1), type=pa.float32())
        columns = [
            pa.array(range(start, start + n), type=pa.int64()),
            pa.array([row["path"] for row in rows], type=pa.string()),
            pa.array(labels, type=schema.field("label").type),
            pa.array([row.get("category") for row in rows], type=pa.string()),
            pa.FixedSizeListArray.from_arrays(flat, layout.dim),
        ]
        yield pa.Table.from_arrays(columns, schema=schema)
        start += n


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
