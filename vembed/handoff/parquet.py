"""Parquet: one file per store shard (``part-00000.parquet`` ...), the layout Milvus, Spark, DuckDB,
LanceDB and pandas read. Written atomically (a temp folder, then renamed); read back and compared
row by row with the store before it is renamed into place."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from vembed.console import progress
from vembed.errors import VembedError
from vembed.extras import require
from vembed.handoff.report import ExportReport
from vembed.handoff.rows import META_KEY, iter_tables, store_layout
from vembed.io import atomic_dir, write_json

# "_" first: Arrow, Spark, DuckDB and Hive-style readers skip it (like Spark's _SUCCESS), so the folder
# reads as one Parquet data set; the name before that is still recognised as a previous export
MARKER = "_vembed-export.json"
MARKERS = (MARKER, "vembed-export.json")


def export_parquet(store: str | Path, out: str | Path, *, show_progress: bool = True) -> ExportReport:
    """Write ``out/part-NNNNN.parquet`` (one per shard) and ``out/_vembed-export.json``; see :mod:`rows`."""
    pq = require("pyarrow.parquet", "parquet", what="vembed store export --to parquet")
    out = Path(out)
    previous = any((out / name).is_file() for name in MARKERS)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not previous)):
        raise VembedError(f"{out} exists and is not a vembed Parquet export; refusing to replace it")
    layout = store_layout(store)
    start = time.perf_counter()
    files = []
    with atomic_dir(out) as tmp, progress(enabled=show_progress) as bar:
        task = bar.add_task("exporting to Parquet", total=layout.count)
        for number, table in enumerate(iter_tables(layout)):
            name = f"part-{number:05d}.parquet"
            pq.write_table(table, tmp / name, compression="zstd")
            back = pq.read_table(tmp / name)
            if back.num_rows != table.num_rows or not _same(back, table):
                raise VembedError(f"{out / name}: the file read back differs from the store's shard {number}")
            files.append(
                {
                    "file": name,
                    "rows": table.num_rows,
                    "first_id": table["id"][0].as_py() if table.num_rows else None,
                }
            )
            bar.update(task, advance=table.num_rows)
        seconds = time.perf_counter() - start
        summary = {"format": "vembed-parquet", "rows": layout.count, "dim": layout.dim, "files": files,
                   "label_type": layout.label_type, "store": str(Path(store).resolve())}  # fmt: skip
        write_json(tmp / MARKER, summary)
    check = f"read back: all {layout.count} rows identical to the store (ids, paths, labels, embeddings)"
    return ExportReport(str(out), layout.count, len(files), seconds, check, {"dim": layout.dim})


def read_parquet_meta(path: str | Path) -> dict:
    """The store's ``meta.json`` kept in a Parquet file's schema metadata."""
    pq = require("pyarrow.parquet", "parquet", what="reading a vembed Parquet export")
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[META_KEY])


def _same(a, b) -> bool:
    if a.column_names != b.column_names:
        return False
    for name in a.column_names:
        if name == "embedding":
            left = a[name].combine_chunks().flatten().to_numpy()
            right = b[name].combine_chunks().flatten().to_numpy()
            if not np.array_equal(left, right):
                return False
        elif a[name].to_pylist() != b[name].to_pylist():
            return False
    return True
