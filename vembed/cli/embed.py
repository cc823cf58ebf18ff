"""``vembed embed`` and ``vembed search``: embedding stores and nearest neighbours (``vembed index``: cli/index.py)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vembed.cli.app import CONFIG_HELP, OVERRIDES_HELP, app, quiet_transformers, settings_from
from vembed.console import log
from vembed.errors import VembedError
from vembed.settings import settings_to_yaml

MODEL_HELP = "Registry name, hub id or local model folder (e.g. a run's final/). Default: model.name."
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


@app.command("embed")
def embed_command(
    source: str = typer.Argument(
        None,
        help="A folder (recursive; sub-folder names become labels), a .jsonl records file, an image, "
        "or - to read image paths from stdin (one per line).",
    ),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    out: str = typer.Option(
        None,
        "--out",
        "-o",
        help="Write an embedding store (a folder) here; with --engine ray DIR.parquet or DB/TABLE.lance.",
    ),
    jsonl: bool = typer.Option(
        False, "--jsonl", help='Stream {"path": ..., "embedding": [...]} lines on stdout instead of a store.'
    ),
    index: str = typer.Option(
        None, "--index", help="Also build a faiss index in the store: flat, hnsw, ivf or ivfpq."
    ),
    batch_size: int = typer.Option(
        None, "--batch-size", "-b", help="Images per forward pass (index.batch_size)."
    ),
    num_workers: int = typer.Option(None, "--num-workers", help="Image-decoding workers (data.num_workers)."),
    skip_bad: bool = typer.Option(
        None, "--skip-bad", help="Skip undecodable images and bad records, and report the count at the end."
    ),
    image_root: Path = typer.Option(
        None, "--image-root", help="Resolve relative paths of a .jsonl source here."
    ),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1, mps (model.device)."),
    append: bool = typer.Option(
        False, "--append", help="Add the source's new images to the existing store --out (same model)."
    ),
    shard_size: int = typer.Option(None, "--shard-size", help="Images per store shard (index.shard_size)."),
    text: str = typer.Option(
        None,
        "--text",
        help="Embed texts instead (one a line from this file, or - for stdin) with a dual encoder's text "
        'tower: {"text": ..., "embedding": [...]} lines (--jsonl).',
    ),
    engine: str = typer.Option(
        "local",
        "--engine",
        help="local (this machine's processes) or ray (Ray Data: tasks decode, actors embed).",
    ),
    actors: int = typer.Option(
        1, "--actors", min=1, help="--engine ray: embedding actors (one GPU each if any)."
    ),
    config: Path = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Embed images into a store folder (--out), or stream JSON lines on stdout (--jsonl).

    Under `torchrun` or `accelerate launch --multi_gpu` the processes share the work, one shard each
    at a time, also without GPUs (`accelerate launch --cpu` starts only one process).
    Rerunning a killed job embeds only the missing shards (see docs/scale.md).
    """
    from vembed.index.embed import stream_jsonl
    from vembed.index.sources import records_from_source
    from vembed.inference import embed_options
    from vembed.models.factory import create_embedder

    if text is not None:
        if source is not None or out is not None:
            raise VembedError("--text embeds texts: give no image source and no --out (use --jsonl)")
        _embed_texts(text, settings_from(config, overrides, model__name=model, model__device=device))
        return
    if source is None:
        raise VembedError("no source: pass a folder, a .jsonl file, an image or - (or --text FILE for texts)")
    if (out is None) == (not jsonl):
        raise VembedError("choose one output: --out STORE (a store folder) or --jsonl (JSON lines on stdout)")
    if index is not None:
        from vembed.index.faiss_index import check_index_kind

        check_index_kind(index)
        if out is None:
            raise VembedError("--index builds a faiss index inside a store; it needs --out STORE")
    if append and out is None:
        raise VembedError("--append adds to a store; it needs --out STORE")
    settings = settings_from(
        config,
        overrides,
        model__name=model,
        model__device=device,
        index__batch_size=batch_size,
        index__shard_size=shard_size,
        data__num_workers=num_workers,
        data__skip_bad=skip_bad,
        data__image_root=image_root,
    )
    data = settings.data
    quiet_transformers()
    name = settings.model.name
    if engine == "ray":
        _embed_with_ray(source, out, settings, actors=actors, blocked=jsonl or append or index is not None)
        return
    if engine != "local":
        raise VembedError(f"--engine {engine}: choose local or ray")
    if out is not None:
        _embed_into_store(source, Path(out), settings, append=append, index=index, quiet=quiet)
        return
    records, problems = records_from_source(source, image_root=data.image_root, skip_bad=data.skip_bad)
    log(f"embedding {len(records)} images from {source} with [bold]{name}[/]")
    embedder = create_embedder(name, settings.model)
    with _stdout_pipe():
        options = embed_options(settings, batch_size=settings.index.batch_size, show_progress=not quiet)
        summary = stream_jsonl(embedder, records, sys.stdout, options, problems=problems)
    _report_problems(summary.problems)
    log(f"embedded {summary.count} images ({summary.images_per_second:.1f} img/s)")


def _embed_texts(source: str, settings) -> None:
    """``{"text", "embedding"}`` JSON lines of the texts of ``source`` (a file, or - for stdin)."""
    from vembed.index.text_search import read_texts, stream_text_jsonl

    texts = read_texts(source)
    quiet_transformers()
    log(f"embedding {len(texts)} texts with [bold]{settings.model.name}[/]")
    with _stdout_pipe():
        dim = stream_text_jsonl(settings.model.name, texts, sys.stdout, settings)
    log(f"embedded {len(texts)} texts ({dim}-d)")


def _embed_with_ray(source: str, out: str | None, settings, *, actors: int, blocked: bool) -> None:
    from vembed.extras import require
    from vembed.integrations.ray import embed_with_ray, output_kind
    from vembed.serve.server import model_kwargs

    if out is None or blocked:
        raise VembedError(
            "--engine ray writes --out DIR.parquet or DB/TABLE.lance (no --jsonl, --append, --index)"
        )
    if output_kind(out) == "lance":
        require("lancedb", "lancedb", what="--out TABLE.lance")
    require("ray.data", "ray", what="vembed embed --engine ray")
    log(f"embedding {source} with [bold]{settings.model.name}[/] on Ray ({actors} actor(s)) → {out}")
    run = embed_with_ray(
        source, out, model=settings.model.name, load_kwargs=model_kwargs(settings.model),
        batch_size=settings.index.batch_size, actors=actors, image_root=settings.data.image_root,
        skip_bad=settings.data.skip_bad, max_pixels=settings.data.max_image_pixels,
    )  # fmt: skip
    _report_problems(run.problems)
    log(
        f"embedded {run.rows} images in {run.seconds:.1f} s ({run.images_per_second:.1f} img/s) → {out} ({run.dim}-d)"
    )


def _embed_into_store(
    source: str, out: Path, settings, *, append: bool, index: str | None, quiet: bool
) -> None:
    """Sharded, restartable embedding; several processes when started by torchrun/accelerate launch."""
    from vembed.index.shards import embed_shards
    from vembed.index.sources import check_source
    from vembed.inference import embed_options
    from vembed.models.factory import create_embedder
    from vembed.processes import device_for, launched_processes

    name = settings.model.name
    check_source(source)  # before the model loads: a typo is said at once
    with launched_processes() as procs:
        if procs.world_size > 1 and source == "-":
            raise VembedError("several processes cannot share stdin; pass a .jsonl file or a folder")
        model_settings = settings.model.model_copy(
            update={"device": device_for(settings.model.device, procs.local_rank, procs.world_size)}
        )
        main = procs.rank == 0
        if main:
            where = f" on {procs.world_size} processes" if procs.world_size > 1 else ""
            log(f"embedding {source} with [bold]{name}[/]{where} → {out}")
        embedder = create_embedder(name, model_settings)
        run = embed_shards(
            embedder,
            source,
            out,
            model=name,
            revision=settings.model.revision,
            shard_size=settings.index.shard_size,
            append=append,
            rank=procs.rank,
            world_size=procs.world_size,
            barrier=procs.barrier,
            embed=embed_options(
                settings, batch_size=settings.index.batch_size, show_progress=not quiet and main
            ),
            image_root=settings.data.image_root,
            settings_yaml=settings_to_yaml(settings),
        )
        embedded, skipped = procs.total(run.embedded, run.skipped)
        if not main:
            return
        _report_problems(run.problems, total=skipped)
        log(
            f"embedded {embedded} images in {run.seconds:.1f} s ({embedded / max(run.seconds, 1e-9):.1f} img/s) "
            f"→ {out} ({run.num_blocks} shard(s), {embedder.embed_dim}-d, {embedder.pooling} pooling)"
        )
        if index is not None:
            from vembed.cli.index import build_index

            build_index(out, index, settings)


@app.command("search")
def search_command(
    store: Path = typer.Argument(..., help="A store written by `vembed embed --out`."),
    items: list[str] = typer.Argument(
        None,
        help="QUERY...: image paths, folders, .jsonl records files, or - to read stdin (image paths, or the "
        "JSON lines of `vembed embed --jsonl`); then key=value settings overrides.",
    ),
    k: int = typer.Option(None, "--k", "-k", help="Results per query (index.k, default 10)."),
    jsonl: bool = typer.Option(
        False, "--jsonl", help="JSON lines (query, rank, path, label, score) on stdout instead of a table."
    ),
    grid: Path = typer.Option(
        None, "--grid", help="Also draw each query and its top-k thumbnails into this PNG."
    ),
    thumb: int = typer.Option(128, "--thumb", help="Grid thumbnail size in pixels."),
    exclude_self: bool = typer.Option(
        False,
        "--exclude-self",
        help="Leave out hits that are the query image itself (searching a store's own images).",
    ),
    kind: str = typer.Option(
        None,
        "--kind",
        help="auto (default), exact, flat, hnsw, ivf or ivfpq (index.kind); see docs/search.md.",
    ),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Query images per forward pass."),
    num_workers: int = typer.Option(None, "--num-workers", help="Image-decoding workers (data.num_workers)."),
    skip_bad: bool = typer.Option(
        None, "--skip-bad", help="Skip undecodable query images and report the count."
    ),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1, mps (model.device)."),
    text: list[str] = typer.Option(
        None, "--text", "-t", help="A text query (repeatable); the store's model needs a text tower."
    ),
    text_file: str = typer.Option(
        None, "--text-file", help="Text queries, one a line, from this file (- for stdin)."
    ),
    rerank: str = typer.Option(
        None,
        "--rerank",
        help="A pairwise re-ranker (a train.task=rerank run's final/): re-score each query's first --top-n "
        "hits (rerank_score); the rest keep their places. A hit whose image is gone keeps its score.",
    ),
    top_n: int = typer.Option(
        None, "--top-n", min=1, help="--rerank: hits re-scored per query (default: the re-ranker's own)."
    ),
    config: Path = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Nearest neighbours of query images (or texts: --text) in a store (the store's own model embeds them)."""
    from vembed.index.grid import draw_grid
    from vembed.index.search import search_queries
    from vembed.index.sources import queries_from_args
    from vembed.index.store import open_store

    query_items, overrides = _split_overrides(items or [])
    settings = settings_from(
        config,
        overrides,
        index__k=k,
        index__kind=kind,
        index__batch_size=batch_size,
        data__num_workers=num_workers,
        data__skip_bad=skip_bad,
        model__device=device,
    )
    texts = list(text or [])
    if top_n is not None and rerank is None:
        raise VembedError("--top-n sets how many hits --rerank re-scores; give --rerank too")
    if rerank is not None and (texts or text_file is not None):
        raise VembedError("--rerank compares images; it does not apply to text queries")
    if texts or text_file is not None:
        from vembed.index.text_search import read_texts, search_texts

        if query_items:
            raise VembedError("give image queries or text queries (--text / --text-file), not both")
        texts += read_texts(text_file) if text_file is not None else []
        quiet_transformers()
        emb_store = open_store(store)
        report, problems = search_texts(emb_store, texts, settings), []
    else:
        if not query_items:
            raise VembedError("no queries: pass image paths, a folder, a .jsonl file, or - to read stdin")
        emb_store = open_store(store)
        queries, problems = queries_from_args(
            query_items, image_root=settings.data.image_root, skip_bad=settings.data.skip_bad
        )
        quiet_transformers()
        report = search_queries(
            emb_store,
            queries,
            settings,
            exclude_self=exclude_self,
            show_progress=not quiet and len(queries) > 1,
        )
        if rerank is not None:
            from vembed.index.search import rerank_results
            from vembed.rerank import load_reranker

            reranker = load_reranker(rerank, device=settings.model.device, dtype=settings.model.dtype)
            report = rerank_results(
                report,
                reranker,
                top_n=top_n,
                batch_size=settings.index.batch_size,
                num_workers=settings.data.num_workers,
                show_progress=not quiet,
            )
    _report_problems(problems + report.problems)
    n = len(report.results)
    log(
        f"searched {n} quer{'y' if n == 1 else 'ies'} against {len(emb_store)} images ({report.method} search)"
    )
    if jsonl:
        with _stdout_pipe():
            for result in report.results:
                sys.stdout.write(
                    "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.to_rows())
                )
            sys.stdout.flush()
    else:
        Console().print(_results_table(report, store))
    if grid is not None:
        draw_grid(report.results, grid, thumb=thumb)
        log(f"wrote {grid}")


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """``key.sub=value`` items that are not existing files are overrides; the rest are queries."""
    queries, overrides = [], []
    for item in items:
        (overrides if _OVERRIDE.match(item) and not Path(item).exists() else queries).append(item)
    return queries, overrides


def _results_table(report, store: Path) -> Table:
    table = Table(
        title=f"top {max((len(r.hits) for r in report.results), default=0)} in {store} ({report.method})"
    )
    for column, justify in (
        ("query", "left"),
        ("rank", "right"),
        ("path", "left"),
        ("label", "left"),
        ("score", "right"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for result in report.results:
        for hit in result.hits:
            table.add_row(
                result.query.name if hit.rank == 1 else "",
                str(hit.rank),
                hit.path,
                "" if hit.label is None else str(hit.label),
                f"{hit.score:.4f}" + (f" → {hit.rerank_score:.4f}" if hit.rerank_score is not None else ""),
                end_section=hit is result.hits[-1],
            )
    return table


def _report_problems(problems: list[str], total: int | None = None) -> None:
    total = len(problems) if total is None else total
    if not total:
        return
    log(f"[yellow]skipped {total} bad record(s)/image(s):[/]")
    for message in problems[:5]:
        log(f"  {message}")
    if total > 5:
        log(f"  ... and {total - 5} more")


@contextlib.contextmanager
def _stdout_pipe():
    """Stop quietly when the reader of stdout goes away (``vembed embed ... --jsonl | head``)."""
    try:
        yield
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None
