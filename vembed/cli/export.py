"""``vembed export`` (a self-contained model folder, optional ONNX) and ``vembed quickstart``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vembed.cli.app import app, quiet_transformers
from vembed.console import log
from vembed.io import write_json


@app.command("export")
def export_command(
    source: str = typer.Argument(
        ..., help="Run directory (its final/ is exported), model folder, registry name or hub id."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (replaced as a whole if it exists)."),
    onnx: bool = typer.Option(
        None,
        "--onnx/--no-onnx",
        help="Also write model.onnx and check it against PyTorch with onnxruntime. "
        "Default: the run's export.onnx setting (off).",
    ),
    dtype: str = typer.Option(
        None,
        "--dtype",
        help="Weights as float32, float16 or bfloat16. Default: the run's export.dtype setting (float32).",
    ),
    json_out: Path = typer.Option(None, "--json", help="Also write the export summary here as JSON."),
    truncate_dim: int = typer.Option(
        None,
        "--truncate-dim",
        help="Keep the first N embedding dims, re-normalised (a train.matryoshka_dims width; "
        "model.truncate_dim).",
    ),
) -> None:
    """Write a model folder that vembed and plain transformers.AutoModel load (LoRA merged)."""
    from vembed.export import export_model

    quiet_transformers()
    result = export_model(source, out, dtype=dtype, onnx=onnx, truncate_dim=truncate_dim)
    table = Table(title=f"exported {result.model}", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("folder", str(result.out_dir))
    table.add_row("files", ", ".join(result.files))
    table.add_row("embedding", f"{result.embed_dim} dims, weights {result.dtype}")
    table.add_row("max |Δ| vs source", f"{result.max_abs_diff:.2e}")
    if result.onnx_path is not None:
        table.add_row("ONNX max |Δ| vs PyTorch", f"{result.onnx_max_abs_diff:.2e}")
    table.add_row("seconds", f"{result.seconds:.1f}")
    Console(stderr=True).print(table)
    if json_out is not None:
        write_json(json_out, result.to_json())
        log(f"wrote {json_out}")


@app.command("quickstart")
def quickstart_command(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", "-o", help="Folder for data, model and run."),
    epochs: int = typer.Option(None, "--epochs", help="Training epochs (default: the quickstart's)."),
    images_per_class: int = typer.Option(
        None, "--images-per-class", help="Use at most this many digits per class (default: all ~180)."
    ),
) -> None:
    """Offline demo on real images: prepare scikit-learn's digits, train a small ViT, evaluate before/after."""
    from vembed.evaluation.report import comparison_table
    from vembed.quickstart import QuickstartOptions, run_quickstart

    quiet_transformers()
    options = QuickstartOptions()
    if epochs is not None:
        options.epochs = epochs
    if images_per_class is not None:
        options.images_per_class = images_per_class
    result = run_quickstart(out, options)
    Console().print(comparison_table([result.before, result.after], title=result.title))
    log(f"summary: {result.summary_path}  ·  model: {result.final_dir}  ·  {result.seconds:.0f} s in all")
