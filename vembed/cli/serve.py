"""``vembed serve``: the HTTP embedding / search service (see docs/serve.md)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from vembed.cli.app import app, quiet_transformers, settings_from


@app.command("serve")
def serve_command(
    model: str = typer.Argument(
        ..., help="Registry name, hub id or local model folder (e.g. a run's final/)."
    ),
    overrides: list[str] = typer.Argument(
        None, help="key=value settings overrides (e.g. model.dtype=float32)."
    ),
    store: Path = typer.Option(None, "--store", "-s", help="A store (vembed embed --out) for /v1/search."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind; anything but loopback needs --api-key."
    ),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML recipe."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1, mps (model.device)."),
    max_batch: int = typer.Option(
        32, "--max-batch", min=1, help="Images per forward pass, across concurrent requests."
    ),
    max_wait_ms: float = typer.Option(
        5.0, "--max-wait-ms", min=0, help="How long a request waits for others to share its batch."
    ),
    max_body_mb: float = typer.Option(
        32.0, "--max-body-mb", min=0.001, help="Request body limit (413 above)."
    ),
    max_images: int = typer.Option(
        64, "--max-images", min=1, help="Images per /v1/embed request (413 above)."
    ),
    api_key: str = typer.Option(
        None, "--api-key", envvar="VEMBED_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/ routes."
    ),
    allow_root: Path = typer.Option(
        None, "--allow-root", help="Let JSON requests name server-side image paths under this folder."
    ),
) -> None:
    """Serve a model over HTTP: POST /v1/embed, POST /v1/search (with --store), GET /v1/info, /health,
    OpenAPI docs at /docs. Concurrent requests are batched on the model; SIGTERM finishes the requests
    in flight, then exits."""
    from vembed.extras import require

    for module in ("fastapi", "uvicorn", "multipart"):  # before the model loads, not after
        require(module, "serve", what="vembed serve")
    from vembed.serve.server import check_exposure, load_service, run_server
    from vembed.serve.service import ServeOptions

    check_exposure(host, api_key)
    settings = settings_from(config, overrides, model__device=device)
    quiet_transformers()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    options = ServeOptions(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_body_mb=max_body_mb,
        max_images=max_images,
        api_key=api_key,
        allow_root=allow_root,
    )
    service = load_service(model, store=store, settings=settings, options=options)
    run_server(service, host=host, port=port)
