"""``vembed index build`` / ``vembed index info``: faiss indexes inside embedding stores."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vembed.cli.app import CONFIG_HELP, app, settings_from
from vembed.console import log
from vembed.index.faiss_index import check_index_kind

index_app = typer.Typer(help="Faiss indexes inside embedding stores.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build_command(
    store: Path = typer.Argument(..., help="A store written by `vembed embed --out`."),
    overrides: list[str] = typer.Argument(
        None, help="key=value overrides, e.g. index.hnsw_m=48 index.nlist=1024 index.train_size=100000."
    ),
    kind: str = typer.Option(
        "hnsw",
        "--kind",
        help="flat (exact), hnsw (graph), ivf (clusters) or ivfpq (clusters + compressed codes).",
    ),
    nlist: int = typer.Option(
        None, "--nlist", help="IVF kinds: number of clusters (index.nlist; default ~4·sqrt(N))."
    ),
    m: int = typer.Option(
        None, "--m", help="ivfpq: sub-quantizers per vector, dividing the dim (index.pq_m)."
    ),
    nbits: int = typer.Option(
        None, "--nbits", help="ivfpq: bits per sub-quantizer code (index.pq_nbits, 8)."
    ),
    opq: bool = typer.Option(None, "--opq", help="ivfpq: learn an OPQ rotation first (index.opq)."),
    config: Path = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
) -> None:
    """Build a faiss index and save it in the store (shard by shard); `vembed search` then uses it."""
    settings = settings_from(
        config, overrides, index__nlist=nlist, index__pq_m=m, index__pq_nbits=nbits, index__opq=opq
    )
    build_index(store, kind, settings)


@index_app.command("info")
def index_info_command(
    store: Path = typer.Argument(..., help="A store folder."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. index.nprobe=32."),
    sample: int = typer.Option(
        1000,
        "--sample",
        help="Store vectors used as queries to measure the index's recall and QPS (0: skip).",
    ),
    k: int = typer.Option(10, "--k", "-k", help="Recall@k against exact search."),
    config: Path = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
) -> None:
    """Show what a store holds (count, dim, model, shards) and its faiss index: size, recall@k against
    exact search on a sample, queries per second."""
    from vembed.index.faiss_index import INDEX_FILE, load_index, measure_index
    from vembed.index.store import store_summary

    settings = settings_from(config, overrides)
    summary = store_summary(store)
    meta = summary["meta"]
    table = Table(title=str(store), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    rows = {
        "images": summary["count"],
        "dim": summary["dim"],
        "shards": summary["shards"],
        "normalized": meta.get("normalize"),
        "model": meta.get("model", {}).get("source"),
        "pooling": meta.get("model", {}).get("pooling"),
        "image size": meta.get("preprocessing", {}).get("image_size"),
        "labelled": summary["labelled"],
        "skipped when embedded": meta.get("num_skipped"),
        "created": meta.get("created"),
        "vembed": meta.get("vembed_version"),
    }
    index = load_index(store, count=summary["count"], dim=summary["dim"], mmap=settings.index.mmap)
    if index is None:
        rows["faiss index"] = "none (exact search)"
    else:
        rows["faiss index"] = json.dumps({key: v for key, v in index.info.items() if key != "dim"})
        size = (store / INDEX_FILE).stat().st_size
        rows["index size"] = (
            f"{size / 2**20:.1f} MiB ({size / max(summary['count'], 1):.1f} bytes per vector)"
        )
        if sample > 0:
            measured = measure_index(store, index, settings.index, sample=sample, k=k)
            rows[f"recall@{k} vs exact"] = (
                f"{measured[f'recall@{k}']:.4f} on {measured['queries']} store vectors"
            )
            rows["queries per second"] = (
                f"{measured['qps']:.0f} (exact: {measured['exact_qps']:.0f}; {measured['speedup']:.1f}x)"
            )
    for key, value in rows.items():
        table.add_row(key, str(value))
    Console().print(table)


def build_index(store: Path, kind: str, settings) -> None:
    import time

    from vembed.index.faiss_index import build_store_index, save_index

    kind = check_index_kind(kind)
    start = time.perf_counter()
    index = build_store_index(store, kind, settings.index)
    save_index(index, store)
    log(
        f"built the {kind} index over {index.info['count']} vectors in {time.perf_counter() - start:.1f} s → {store}"
    )
