"""``vembed store export``: hand a store to Parquet (Milvus bulk import), LanceDB or Qdrant."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vembed.cli.app import app
from vembed.console import log
from vembed.errors import VembedError

store_app = typer.Typer(help="Embedding stores: hand them to vector databases.", no_args_is_help=True)
app.add_typer(store_app, name="store")

TARGETS = ("parquet", "lancedb", "qdrant")


@store_app.command("export")
def export_store_command(
    store: Path = typer.Argument(..., help="A store written by `vembed embed --out`."),
    to: tuple[str, str] = typer.Option(
        ...,
        "--to",
        help="KIND TARGET: 'parquet DIR' (one file per shard; Milvus bulk import), 'lancedb URI' "
        "(a folder or s3://...), or 'qdrant URL_OR_PATH' (http://host:6333, or a folder for Qdrant's local mode).",
    ),
    collection: str = typer.Option(
        None,
        "--collection",
        help="LanceDB table / Qdrant collection name (default: the store folder's name).",
    ),
    sample: int = typer.Option(
        20, "--sample", min=1, help="Sampled queries for the self-check (top-10 vs exact)."
    ),
    index_min_rows: int = typer.Option(
        100_000, "--index-min-rows", min=1, help="LanceDB: build an IVF-PQ index from this many rows on."
    ),
    api_key: str = typer.Option(None, "--api-key", envvar="QDRANT_API_KEY", help="Qdrant server API key."),
    json_out: Path = typer.Option(None, "--json", help="Also write the export report here as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Export a store, streaming shard by shard, then check the copy: the same rows (Parquet) or the
    same top-10 as vembed's exact search for sampled queries (LanceDB, Qdrant; recall when indexed)."""
    kind, target = to
    kind = kind.lower()
    if kind not in TARGETS:
        raise VembedError(f"--to {kind}: choose one of {', '.join(TARGETS)} (then the target)")
    if kind == "parquet":
        from vembed.handoff.parquet import export_parquet

        report = export_parquet(store, target, show_progress=not quiet)
    elif kind == "lancedb":
        from vembed.handoff.lancedb import export_lancedb

        report = export_lancedb(
            store,
            target,
            table=collection,
            index_min_rows=index_min_rows,
            sample=sample,
            show_progress=not quiet,
        )
    else:
        from vembed.handoff.qdrant import export_qdrant

        report = export_qdrant(
            store, target, collection=collection, api_key=api_key, sample=sample, show_progress=not quiet
        )
    log(
        f"exported {report.rows} rows from {store} → {report.target} in {report.seconds:.1f} s "
        f"({report.rows_per_second:,.0f} rows/s); check: {report.check}"
    )
    if json_out is not None:
        from vembed.io import write_json

        write_json(json_out, report.to_json())
    print(json.dumps(report.to_json(), ensure_ascii=False, default=str))
