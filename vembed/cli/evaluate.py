"""``vembed eval``: retrieval metrics (Recall@K, MAP@R), zero-shot vs fine-tuned side by side."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from vembed.cli.app import app, quiet_transformers, settings_from
from vembed.console import console, log
from vembed.errors import VembedError
from vembed.io import write_json, write_text
from vembed.models.loader import resolve_ref
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
    _evaluate(
        settings,
        [settings.model.name, *(compare or [])],
        data,
        gallery,
        json_out,
        title=f"retrieval on {data}" + (f" ({index} index)" if index else ""),
        dims=widths,
        index=index,
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
) -> None:
    from vembed.evaluation.report import comparison_json, comparison_table  # torch: imported on use
    from vembed.evaluation.run import evaluate_retrieval
    from vembed.processes import launched_processes

    quiet_transformers()
    for name in models:
        resolve_ref(name)  # every model name checked before the first evaluation starts
    reports = []
    with launched_processes() as procs:  # torchrun / accelerate launch: ranking split across processes
        if procs.rank > 0:
            console.quiet = True  # one process reports
        where = f" on {procs.world_size} processes" if procs.world_size > 1 else ""
        for name in models:
            log(f"evaluating [bold]{name}[/] on {data}{where}")
            reports.append(
                evaluate_retrieval(
                    name,
                    data,
                    gallery=gallery,
                    settings=settings,
                    dims=dims or (),
                    index=index,
                    processes=procs,
                )
            )
    if procs.rank > 0:
        return
    rows = [row for report in reports for row in report.by_width()]
    Console().print(comparison_table(rows, title=title))
    if json_out is not None:
        write_json(json_out, comparison_json(reports))
        write_text(json_out.with_suffix(".settings.yaml"), settings_to_yaml(settings))
        log(f"wrote {json_out}")
