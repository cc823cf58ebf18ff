"""LanceDB: a table with the store's rows (local folder or object storage URI), IVF-PQ past a size."""

from __future__ import annotations

import re
import time
from pathlib import Path

from vembed.console import progress
from vembed.errors import VembedError
from vembed.extras import require
from vembed.handoff.check import check_export
from vembed.handoff.report import ExportReport
from vembed.handoff.rows import arrow_schema, iter_tables, store_layout

INDEX_MIN_ROWS = 100_000  # below this LanceDB's exact scan is fast enough and exact


def default_collection(store: str | Path) -> str:
    """The table / collection name when none is given: the store folder's name, made safe."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(store).resolve().name).strip("_")
    return name or "vembed"


def export_lancedb(
    store: str | Path, uri: str, *, table: str | None = None, index_min_rows: int = INDEX_MIN_ROWS,
    nprobes: int = 20, refine_factor: int = 10, sample: int = 20, show_progress: bool = True,
) -> ExportReport:  # fmt: skip
    """Write (or replace) table ``table`` in the LanceDB database at ``uri``, shard by shard.

    Past ``index_min_rows`` rows an IVF-PQ index (cosine) is built; the self-check then states its
    recall@10 at ``nprobes`` / ``refine_factor``, the knobs a LanceDB query sets.
    """
    lancedb = require("lancedb", "lancedb", what="vembed store export --to lancedb")
    layout = store_layout(store)
    name = table or default_collection(store)
    start = time.perf_counter()
    db = lancedb.connect(uri)
    lance_table = db.create_table(name, schema=arrow_schema(layout), mode="overwrite")
    with progress(enabled=show_progress) as bar:
        task = bar.add_task("exporting to LanceDB", total=layout.count)
        for shard in iter_tables(layout):
            lance_table.add(shard)
            bar.update(task, advance=shard.num_rows)
    indexed = layout.count >= index_min_rows
    details = {"table": name, "uri": uri, "index": None}
    if indexed:
        partitions = max(1, min(4096, int(layout.count**0.5)))
        sub_vectors = _sub_vectors(layout.dim)
        lance_table.create_index(
            metric="cosine", vector_column_name="embedding", num_partitions=partitions,
            num_sub_vectors=sub_vectors, index_type="IVF_PQ",
        )  # fmt: skip
        details["index"] = {"kind": "IVF_PQ", "num_partitions": partitions, "num_sub_vectors": sub_vectors,
                            "nprobes": nprobes, "refine_factor": refine_factor}  # fmt: skip
    seconds = time.perf_counter() - start
    if lance_table.count_rows() != layout.count:
        raise VembedError(
            f"{uri}/{name}: {lance_table.count_rows()} rows after the export, the store has {layout.count}"
        )

    def search(queries, k):
        out = []
        for q in queries:
            query = lance_table.search(q, vector_column_name="embedding").distance_type("cosine").limit(k)
            if indexed:
                query = query.nprobes(nprobes).refine_factor(refine_factor)
            rows = query.select(["id", "_distance"]).to_list()
            out.append([(int(r["id"]), 1.0 - float(r["_distance"])) for r in rows])
        return out

    check = check_export(store, search, sample=sample)
    details["self_check"] = check.to_json()
    return ExportReport(
        f"{uri} table {name}", layout.count, layout.shards, seconds, check.describe(), details
    )


def _sub_vectors(dim: int) -> int:
    """PQ sub-vectors: dim/8 (8-d sub-vectors), or the largest divisor of dim below that."""
    want = max(1, dim // 8)
    return next(m for m in range(want, 0, -1) if dim % m == 0)
