"""``vembed mine``: corpus-mined hard negatives for ``train.hard_negatives`` (the library: vembed/mining.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vembed.cli.app import CONFIG_HELP, OVERRIDES_HELP, app, quiet_transformers, settings_from


@app.command("mine")
def mine_command(
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Registry name, hub id or model folder (a run's final/); default model.name.",
    ),
    data: Path = typer.Option(..., "--data", "-d", help="Labelled image records (JSONL) to mine."),
    out: Path = typer.Option(..., "--out", "-o", help="The records again, each with a 'negatives' list."),
    k: int = typer.Option(8, "--k", "-k", help="Negatives per record (at most)."),
    same_category: bool = typer.Option(
        False, "--same-category", help="Only negatives of the record's own 'category' (SOP's super-class)."
    ),
    margin: float = typer.Option(
        0.05,
        "--margin",
        help="False-negative guard: drop a candidate more similar to the anchor than the anchor's most "
        "similar positive minus this margin (inf: no guard).",
    ),
    index: str = typer.Option(
        "auto",
        "--index",
        help="exact (chunked matrix products), a faiss kind (flat, hnsw, ivf, ivfpq; index.* settings), or "
        "auto: exact up to index.faiss_threshold images (200,000), hnsw above.",
    ),
    batch_size: int = typer.Option(
        None, "--batch-size", "-b", help="Images per forward pass (eval.batch_size)."
    ),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1, mps (model.device)."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    config: Path = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or log line."),
) -> None:
    """Mine each record's hard negatives: its nearest images of OTHER labels under the model.

    Exact cosine ranking, chunked (faiss above index.faiss_threshold images: --index). A candidate more similar to the anchor than the anchor's most
    similar positive minus --margin is dropped (most likely the same item under another label). Every
    record is written back unchanged plus "negatives": the "image" strings of its negatives' records,
    best first (they resolve like "image"). Relative image paths resolve against the records file's
    folder: write --out next to --data (or set data.image_root). Prints one JSON summary line on
    stdout; train on the output with train.hard_negatives=K.
    """
    from vembed.inference import embed_options
    from vembed.mining import log_summary, mine_file
    from vembed.models.factory import create_embedder

    settings = settings_from(
        config, overrides, model__name=model, model__device=device, eval__batch_size=batch_size
    )
    quiet_transformers()
    summary = mine_file(
        lambda: create_embedder(settings.model.name, settings.model),
        data,
        out,
        k=k,
        margin=margin,
        same_category=same_category,
        image_root=settings.data.image_root,
        options=embed_options(settings, show_progress=not quiet),
        index=index,
        index_settings=settings.index,
    )
    if not quiet:
        log_summary(summary)
    print(json.dumps(summary))
