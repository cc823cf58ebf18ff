"""Qdrant: a collection (cosine distance) whose points are the store's rows, the manifest as payload.

``target`` is a server URL (``http://host:6333``) or a local folder (Qdrant's embedded mode, exact
search; ``:memory:`` for a throw-away one). Points are uploaded in batches, shard by shard.
"""

from __future__ import annotations

import time
from pathlib import Path

from vembed.console import progress
from vembed.errors import VembedError
from vembed.extras import require
from vembed.handoff.check import check_export
from vembed.handoff.lancedb import default_collection
from vembed.handoff.report import ExportReport
from vembed.handoff.rows import iter_tables, store_layout


def qdrant_client(target: str, *, api_key: str | None = None):
    """A ``QdrantClient`` for a URL, or for a local folder (embedded mode)."""
    require("qdrant_client", "qdrant", what="vembed store export --to qdrant")
    from qdrant_client import QdrantClient

    if target.startswith(("http://", "https://")):
        return QdrantClient(url=target, api_key=api_key)
    if target == ":memory:":
        return QdrantClient(location=":memory:")
    return QdrantClient(path=str(Path(target).expanduser()))


def export_qdrant(
    store: str | Path, target: str, *, collection: str | None = None, batch_size: int = 1024,
    api_key: str | None = None, sample: int = 20, show_progress: bool = True, client=None,
) -> ExportReport:  # fmt: skip
    """Create (or replace) ``collection`` and upload every row; ids are the store's row numbers."""
    require("qdrant_client", "qdrant", what="vembed store export --to qdrant")
    from qdrant_client import models

    layout = store_layout(store)
    name = collection or default_collection(store)
    client = client or qdrant_client(target, api_key=api_key)
    start = time.perf_counter()
    if client.collection_exists(name):
        client.delete_collection(name)
    client.create_collection(
        name, vectors_config=models.VectorParams(size=layout.dim, distance=models.Distance.COSINE)
    )
    with progress(enabled=show_progress) as bar:
        task = bar.add_task("exporting to Qdrant", total=layout.count)
        for table in iter_tables(layout):
            ids = table["id"].to_pylist()
            vectors = table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, layout.dim)
            payloads = table.select(["path", "label", "category"]).to_pylist()
            for lo in range(0, len(ids), batch_size):
                hi = lo + batch_size
                client.upsert(
                    name,
                    points=models.Batch(
                        ids=ids[lo:hi], vectors=vectors[lo:hi].tolist(), payloads=payloads[lo:hi]
                    ),
                    wait=True,
                )
                bar.update(task, advance=len(ids[lo:hi]))
    seconds = time.perf_counter() - start
    count = client.count(name, exact=True).count
    if count != layout.count:
        raise VembedError(
            f"{target} collection {name}: {count} points after the export, the store has {layout.count}"
        )

    def search(queries, k):
        out = []
        for q in queries:
            points = client.query_points(name, query=q.tolist(), limit=k, with_payload=False).points
            out.append([(int(p.id), float(p.score)) for p in points])
        return out

    check = check_export(store, search, sample=sample)
    details = {"collection": name, "target": target, "self_check": check.to_json()}
    return ExportReport(
        f"{target} collection {name}", layout.count, layout.shards, seconds, check.describe(), details
    )
