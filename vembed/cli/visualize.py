"""``vembed visualize pca``: pictures of what a backbone sees."""

from __future__ import annotations

from pathlib import Path

import typer

from vembed.cli.app import app, quiet_transformers
from vembed.console import log
from vembed.errors import VembedError

visualize_app = typer.Typer(help="Pictures of what a backbone sees.", no_args_is_help=True)
app.add_typer(visualize_app, name="visualize")


@visualize_app.command("pca")
def pca_command(
    model: str = typer.Argument(
        ..., help="Registry name, hub id or local model folder (e.g. a run's final/)."
    ),
    images: list[str] = typer.Argument(
        ..., help="Images: files, folders (recursive) or .jsonl records files, in order."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The PNG to write."),
    compare: list[str] = typer.Option(None, "--compare", help="Also show this model's PCA (repeatable)."),
    max_images: int = typer.Option(16, "--max-images", help="Draw at most this many images (rows)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
) -> None:
    """The first three principal components of the backbone's patch features as RGB beside each image
    (one row per image; one PCA fitted on all the images' patches together, per model)."""
    from vembed.index.sources import records_from_source
    from vembed.models.factory import load_embedder
    from vembed.visualize import plot_pca

    if max_images < 1:
        raise VembedError(f"--max-images must be at least 1, got {max_images}")
    paths = [rec.image for source in images for rec in records_from_source(source)[0]]
    if not paths:
        raise VembedError(f"no images in {', '.join(images)}")
    if len(paths) > max_images:
        log(f"drawing the first {max_images} of {len(paths)} images (--max-images)")
    quiet_transformers()
    models = [(name, load_embedder(name, device=device)) for name in [model, *(compare or [])]]
    written, results = plot_pca(models, paths, out, max_images=max_images)
    for result in results:
        share = ", ".join(f"{100 * e:.1f}" for e in result.explained)
        log(f"{result.model}: PC1-3 explain {share} % of the patch-feature variance")
    log(f"wrote {written}")
