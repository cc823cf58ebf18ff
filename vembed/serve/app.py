"""The HTTP layer of ``vembed serve``: a FastAPI app over an :class:`~vembed.serve.service.EmbedService`.

Routes: ``POST /v1/embed``, ``POST /v1/search``, ``GET /v1/info``, ``GET /health`` and the OpenAPI
pages (``/docs``, ``/openapi.json``). Every refusal is a 4xx with one line of JSON
``{"error": "..."}``; the request body is capped (``--max-body-mb``) before it is read whole, by
``Content-Length`` and again while it streams in.
"""

from __future__ import annotations

import hmac
import json
from contextlib import asynccontextmanager
from typing import Any

from vembed import __version__
from vembed.extras import require
from vembed.serve.batcher import DynamicBatcher
from vembed.serve.service import EmbedService, RequestError, decode_base64

require("fastapi", "serve", what="vembed serve")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.requests import ClientDisconnect  # noqa: E402

_IMAGE_SCHEMA = {"type": "string", "format": "binary"}
EMBED_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": _IMAGE_SCHEMA}},
                    "required": ["images"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string"}, "description": "base64"},
                        "texts": {"type": "array", "items": {"type": "string"}, "description": "text tower"},
                        "paths": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "--allow-root",
                        },
                    },
                }
            },
        },
    }
}
_SEARCH_FIELDS = {
    "k": {"type": "integer", "default": 10},
    "label": {"type": "string"},
    "category": {"type": "string"},
}
SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": _IMAGE_SCHEMA, **_SEARCH_FIELDS},
                    "required": ["image"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "description": "base64"},
                        "text": {"type": "string", "description": "text tower"},
                        "path": {"type": "string", "description": "--allow-root"},
                        **_SEARCH_FIELDS,
                    },
                }
            },
        },
    }
}


def create_app(service: EmbedService) -> FastAPI:
    """The app; its lifespan starts the dynamic batcher and, at shutdown, stops it after the last batch."""
    options = service.options
    batcher = DynamicBatcher(service.encode, max_batch=options.max_batch, max_wait_ms=options.max_wait_ms)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="vembed",
        version=__version__,
        description=f"Image embeddings and search with {service.model_name}.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=int(options.max_body_mb * 2**20))
    _add_error_handlers(app)

    def check_key(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), options.api_key):
            raise RequestError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")

    @app.get("/health", summary="Liveness: 200 once the model is loaded")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info", summary="Model, dim, preprocessing, store size, index kind, limits")
    async def info(request: Request) -> dict:
        check_key(request)
        return {**service.info(), "batching": batcher.stats.to_json()}

    @app.post(
        "/v1/embed",
        summary="Embeddings of images (multipart 'images' or JSON base64)",
        openapi_extra=EMBED_BODY,
    )
    async def embed(request: Request) -> dict:
        check_key(request)
        if _is_multipart(request):
            form = await _form(request, options.max_images)
            items = [await _upload(f, i) for i, f in enumerate(form.getlist("images"))]
            if not items and form.getlist("texts"):
                return _embeddings(service, await batcher.run(service.encode_texts, form.getlist("texts")))
            if not items:
                raise RequestError(400, "no 'images' files in the form (curl -F images=@photo.jpg)")
        else:
            body = await _json(request)
            if "texts" in body:
                return _embeddings(service, await batcher.run(service.encode_texts, body["texts"]))
            items = await _json_images(service, body)
        pixels = await run_in_threadpool(service.pixels_batch, items)
        return _embeddings(service, await batcher.embed(pixels))

    @app.post(
        "/v1/search",
        summary="The store's top-k for one image (multipart 'image' or JSON)",
        openapi_extra=SEARCH_BODY,
    )
    async def search(request: Request) -> dict:
        check_key(request)
        if service.store is None:
            raise RequestError(404, "no store: start the server with --store STORE to search")
        if _is_multipart(request):
            form = await _form(request, 1)
            files = form.getlist("image")
            if len(files) != 1 or isinstance(files[0], str):
                raise RequestError(400, "send exactly one 'image' file (curl -F image=@query.jpg)")
            fields: dict[str, Any] = {key: form.get(key) for key in ("k", "label", "category")}
            item = await _upload(files[0], 0, field="image")
            text = None
        else:
            fields = await _json(request)
            text = fields.get("text")
            if text is not None:
                item = None
            elif "image" in fields:
                item = (decode_base64(fields["image"], "image"), "image")
            elif "path" in fields:
                item = await run_in_threadpool(service.read_path, str(fields["path"]))
            else:
                raise RequestError(400, "the JSON body needs 'image' (base64), 'text' or 'path'")
        k = _k(fields.get("k"))
        if item is None:
            embedding = (await batcher.run(service.encode_texts, [text]))[0]
        else:
            pixels = await run_in_threadpool(service.pixels_batch, [item])
            embedding = (await batcher.embed(pixels))[0]
        results = await run_in_threadpool(
            service.search, embedding, k, label=fields.get("label"), category=fields.get("category")
        )
        return {"results": results}

    return app


def _embeddings(service: EmbedService, embeddings) -> dict:
    return {"embeddings": embeddings.tolist(), "dim": int(embeddings.shape[1]), "model": service.model_name}


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def _form(request: Request, max_files: int):
    try:
        return await request.form(max_files=max_files + 1, max_fields=16)
    except ClientDisconnect:
        raise RequestError(400, "the client disconnected before sending the whole body") from None


async def _upload(upload, i: int, *, field: str = "images") -> tuple[bytes, str]:
    if isinstance(upload, str):
        raise RequestError(400, f"{field}[{i}]: a text field, not a file (curl -F {field}=@photo.jpg)")
    return await upload.read(), upload.filename or f"{field}[{i}]"


async def _json(request: Request) -> dict:
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise RequestError(400, "the client disconnected before sending the whole body") from None
    if not raw:
        raise RequestError(400, "empty body: send multipart files or a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(
            400, f"the body is not JSON ({exc.__class__.__name__}); send multipart or JSON"
        ) from None
    if not isinstance(body, dict):
        raise RequestError(400, "the JSON body must be an object")
    return body


async def _json_images(service: EmbedService, body: dict) -> list[tuple[bytes, str]]:
    if "images" in body:
        images = body["images"]
        if not isinstance(images, list):
            raise RequestError(400, "'images' must be a list of base64 strings")
        if len(images) > service.options.max_images:
            raise RequestError(
                413,
                f"{len(images)} images in one request; at most {service.options.max_images} (--max-images)",
            )
        return [(decode_base64(text, f"images[{i}]"), f"images[{i}]") for i, text in enumerate(images)]
    if "paths" in body:
        paths = body["paths"]
        if not isinstance(paths, list):
            raise RequestError(400, "'paths' must be a list of strings")
        if len(paths) > service.options.max_images:
            raise RequestError(
                413, f"{len(paths)} paths in one request; at most {service.options.max_images}"
            )
        return [await run_in_threadpool(service.read_path, str(p)) for p in paths]
    raise RequestError(400, "the JSON body needs 'images' (a list of base64 strings)")


def _k(value: Any) -> int:
    if value in (None, ""):
        return 10
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise RequestError(422, f"k={value!r}: not an integer") from None
    if isinstance(value, float) and value != k:
        raise RequestError(422, f"k={value!r}: not an integer")
    return k


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_request, exc: RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, str(exc), headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return _error(exc.status_code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):  # a bug: still one line of JSON, and logged
        import traceback

        traceback.print_exception(exc)
        return _error(500, f"internal error: {exc.__class__.__name__}: {exc}")


class _TooLarge(RequestError):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (by ``Content-Length``, or while streaming)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        message = f"the request body is over the limit of {limit / 2**20:g} MiB (--max-body-mb)"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return await _send_json(send, 413, message)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    raise _TooLarge(413, message)
            return msg

        async def watched_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, message)


async def _send_json(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
