"""Load the model once and run the HTTP service under uvicorn (``vembed serve``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from vembed.console import log
from vembed.errors import VembedError
from vembed.extras import require
from vembed.serve.service import EmbedService, ServeOptions
from vembed.settings import ModelSettings, Settings

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def model_kwargs(model: ModelSettings) -> dict:
    """:func:`~vembed.models.factory.load_embedder` keyword arguments from ``model.*`` settings."""
    return {
        "pooling": model.pooling,
        "projection_dim": model.projection_dim,
        "normalize": model.normalize,
        "image_size": model.image_size,
        "revision": model.revision,
        "device": model.device,
        "dtype": model.dtype,
        "attention": model.attention,
        "truncate_dim": model.truncate_dim,
    }


def load_service(
    model: str | Path, *, store: str | Path | None = None, settings: Settings | None = None,
    options: ServeOptions | None = None,
) -> EmbedService:  # fmt: skip
    """The model (``model.*`` settings: device, dtype, ...) and the store, loaded once and checked:
    the model must be the one that made the store (dim, preprocessing and probe embedding)."""
    from vembed.index.store import check_store_model, open_store

    settings = settings or Settings()
    embedder = _load_model(str(model), settings.model)
    emb_store = None
    if store is not None:
        emb_store = open_store(store)
        check_store_model(emb_store, embedder)
    return EmbedService(
        embedder,
        str(model),
        emb_store,
        settings.index,
        options or ServeOptions(),
        max_pixels=settings.data.max_image_pixels,
    )


def _load_model(model: str, settings: ModelSettings):
    """The image embedder every other command loads (``vembed embed`` gives the same embeddings); when
    the model also has a text tower whose image embeddings are these same ones (a folder ``vembed
    train`` / ``export`` wrote for an image-text run), the dual encoder instead: ``/v1/embed`` then takes
    ``texts``. A raw CLIP / SigLIP checkpoint's vision features are not its shared image-text space, so
    it serves images only (said at start)."""
    import torch

    from vembed.index.store import probe_embedding
    from vembed.models.dual import has_text_tower, load_dual_encoder
    from vembed.models.factory import load_embedder
    from vembed.models.loader import load_model

    embedder = load_embedder(model, **model_kwargs(settings))
    if not has_text_tower(load_model(model, revision=settings.revision, weights=False)):
        return embedder
    dual = load_dual_encoder(
        model, revision=settings.revision, device=settings.device, dtype=settings.dtype,
        attention=settings.attention,
    )  # fmt: skip
    if dual.embed_dim == embedder.embed_dim and dual.spec.preprocessing() == embedder.spec.preprocessing():
        cosine = torch.nn.functional.cosine_similarity(
            probe_embedding(dual), probe_embedding(embedder)
        ).item()
        if cosine >= 0.9999:
            return dual
    log(
        f"[yellow]note:[/] {model} has a text tower, but its image embeddings as vembed embeds them are the "
        "vision tower's own features, not the image-text space; serving images only ('texts' → 400)"
    )
    return embedder


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    """Anything but loopback needs an API key: the service would otherwise be open to the network."""
    if not is_loopback(host) and not api_key:
        raise VembedError(
            f"--host {host} is reachable from other machines: pass --api-key KEY (or set VEMBED_API_KEY) "
            "so that requests must send 'Authorization: Bearer KEY', or keep the default 127.0.0.1"
        )


def run_server(
    service: EmbedService, *, host: str = "127.0.0.1", port: int = 8000, graceful_seconds: float = 30,
    log_level: str = "info",
) -> None:  # fmt: skip
    """Serve until SIGINT/SIGTERM; then stop accepting, let the requests in flight finish (up to
    ``graceful_seconds``), run the last batch and exit."""
    check_exposure(host, service.options.api_key)
    uvicorn = require("uvicorn", "serve", what="vembed serve")
    from vembed.serve.app import create_app

    app = create_app(service)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=graceful_seconds,
        server_header=False,
    )
    where = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    store = service.store
    log(
        f"serving [bold]{service.model_name}[/] ({service.embedder.embed_dim}-d, {service.embedder.device}, "
        f"{str(service.embedder.dtype).removeprefix('torch.')})"
        + (f" with {len(store)} images ({service.method} search)" if store is not None else "")
        + f" on {where} (docs: {where}/docs)"
    )
    uvicorn.Server(config).run()
