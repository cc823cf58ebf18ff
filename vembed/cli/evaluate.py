"""``vembed eval``: retrieval metrics (Recall@K, MAP@R), zero-shot vs fine-tuned side by side."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from vembed.cli.app import app, quiet_transformers, settings_from
from vembed.console import console, log
from vembed.errors import VembedError
from vembed.io import write_json, write_text
from vembed.settings import Settings, settings_to_yaml

eval_app = typer.Typer(help="Evaluate embedding models.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

MODEL_HELP = "Registry name, hub id or local model folder (e.g. a run's final/)."


@eval_app.command("retrieval")
def retrieval_command(
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Default: model.name."),
    data: Path = typer.Option(None, "--data", "-d", help="Labelled records (JSONL). Default: data.test."),
    gallery: Path = typer.Option(None, "--gallery", help="Gallery records: query/gallery protocol."),
    k: str = typer.Option(None, "--k", help="Recall@K cut-offs, e.g. 1,10,100."),
    json_out: Path = typer.Option(None, "--json", help="Write the metrics here as JSON."),
    compare: list[str] = typer.Option(
        None,
        "--compare",
        help="Also evaluate these models (repeatable); the table shows their deltas against --model.",
    ),
    dims: str = typer.Option(
        None,
        "--dims",
        help="Also score these truncated widths (first N dims, re-normalised), e.g. 64,128,768.",
    ),
    config: Path = typer.Option(None, "--config", "-c", help="YAML recipe."),
    skip_bad: bool = typer.Option(None, "--skip-bad", help="Skip and count bad records/images."),
    index: str = typer.Option(
        None,
        "--index",
        help="Neighbours from a faiss index (hnsw, ivf, ivfpq, flat) instead of exact search; reports the "
        "recall loss against exact on a sample (no MAP@R).",
    ),
    rerank: str = typer.Option(
        None,
        "--rerank",
        help="A pairwise re-ranker (a train.task=rerank run's final/): re-score each query's first "
        "--top-n neighbours; the table shows the embedding's ranking and the re-ranked one, the JSON's "
        "metrics are the re-ranked ones (before_rerank: the embedding's).",
    ),
    top_n: int = typer.Option(
        None,
        "--top-n",
        min=1,
        help="--rerank: neighbours re-scored per query (default: the re-ranker's own).",
    ),
    overrides: list[str] = typer.Argument(None, help="key=value settings overrides."),
) -> None:
    """Recall@K and MAP@R: all-vs-all (SOP protocol), or query/gallery with --gallery.

    Under torchrun / accelerate launch the exact ranking is split across the processes (docs/scale.md).
    """
    from vembed.evaluation.base import parse_dims

    widths = parse_dims(dims)
    settings = settings_from(config, overrides, model__name=model, eval__k=k, data__skip_bad=skip_bad)
    data = data or settings.data.test
    if data is None:
        raise VembedError("no evaluation data: pass --data FILE.jsonl (or set data.test)")
    from vembed.index.faiss_index import KINDS

    if index is not None and index not in KINDS:
        raise VembedError(f"--index {index}: choose one of {', '.join(KINDS)}")
    if top_n is not None and rerank is None:
        raise VembedError("--top-n sets how many neighbours --rerank re-scores; give --rerank too")
    reranker = None
    if rerank is not None:
        from vembed.rerank import load_reranker

        check_models([rerank])
        reranker = load_reranker(rerank, device=settings.model.device, dtype=settings.model.dtype)
    _evaluate(
        settings,
        [settings.model.name, *(compare or [])],
        data,
        gallery,
        json_out,
        title=f"retrieval on {data}" + (f" ({index} index)" if index else ""),
        dims=widths,
        index=index,
        rerank=(reranker, top_n),
    )


@eval_app.command("sop")
def sop_command(
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Default: model.name."),
    data: Path = typer.Option(
        Path("data/sop"),
        "--data",
        "-d",
        help="Folder written by `vembed prepare sop` (uses its test.jsonl), or a JSONL file.",
    ),
    k: str = typer.Option("1,10,100,1000", "--k", help="Recall@K cut-offs."),
    json_out: Path = typer.Option(None, "--json", help="Write the metrics here as JSON."),
    compare: list[str] = typer.Option(None, "--compare", help="Also evaluate these models (repeatable)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML recipe."),
    overrides: list[str] = typer.Argument(None, help="key=value settings overrides."),
) -> None:
    """Stanford Online Products protocol: all-vs-all on the official test split, Recall@1/10/100/1000."""
    settings = settings_from(config, overrides, model__name=model, eval__k=k)
    test = data / "test.jsonl" if data.is_dir() else data
    if not test.is_file():
        raise VembedError(f"SOP test split not found: {test} (run `vembed prepare sop --out {data}` first)")
    _evaluate(
        settings,
        [settings.model.name, *(compare or [])],
        test,
        None,
        json_out,
        title="Stanford Online Products (test, all-vs-all)",
    )


def _evaluate(
    settings: Settings,
    models: list[str],
    data: Path,
    gallery: Path | None,
    json_out: Path | None,
    *,
    title: str,
    dims: list[int] | None = None,
    index: str | None = None,
    rerank: tuple = (None, None),
) -> None:
    from vembed.evaluation.base import read_eval_records
    from vembed.evaluation.compare import compare
    from vembed.evaluation.options import embed_options, retrieval_options
    from vembed.evaluation.report import comparison_json, comparison_table  # torch: imported on use
    from vembed.evaluation.run import RetrievalEvaluator
    from vembed.processes import device_for, launched_processes

    quiet_transformers()
    check_models(models)
    records = dict(image_root=settings.data.image_root, skip_bad=settings.data.skip_bad)
    queries = read_eval_records(data, **records)
    references = read_eval_records(gallery, **records) if gallery is not None else None
    with launched_processes() as procs:  # torchrun / accelerate launch: ranking split across processes
        if procs.rank > 0:
            console.quiet = True  # one process reports
        evaluator = RetrievalEvaluator(
            queries,
            gallery=references,
            embed=embed_options(settings),
            options=retrieval_options(
                settings, dims=dims or (), index=index, rerank=rerank[0], top_n=rerank[1]
            ),
            processes=procs,
        )
        device = device_for(settings.model.device, procs.local_rank, procs.world_size)
        where = f" on {procs.world_size} processes" if procs.world_size > 1 else ""
        result = compare(
            models,
            evaluator,
            load=lambda name: eval_model(name, settings, device=device),
            announce=lambda name: f"evaluating [bold]{name}[/] on {data}{where}",
        )
    if procs.rank > 0:
        return
    reports = result.reports()
    for report in reports:
        if report.problems:
            log(
                f"[yellow]{report.model}: skipped {len(report.problems)} bad image(s)[/]; first: {report.problems[0]}"
            )
    rows = [row for report in reports for row in report.by_width()]
    Console().print(comparison_table(rows, title=title))
    if json_out is not None:
        write_json(json_out, comparison_json(reports))
        write_text(json_out.with_suffix(".settings.yaml"), settings_to_yaml(settings))
        log(f"wrote {json_out}")


def check_models(models: list[str]) -> None:
    """Every model reference checked (the precedence rule, no file read) before any data is read."""
    from vembed.models.loader import resolve_ref

    for name in models:
        resolve_ref(name)


def eval_model(name: str, settings: Settings, *, device: str | None = None):
    """The embedding model ``name`` with the ``model.*`` settings (on ``device`` when given)."""
    from vembed.models.factory import create_embedder

    model = settings.model if device is None else settings.model.model_copy(update={"device": device})
    return create_embedder(name, model)
