"""What ``vembed serve`` does for each request, without any HTTP: decode, embed, search.

:class:`EmbedService` holds the model (loaded once), its eval transform, the store and its faiss
index (chosen once, at start: :func:`vembed.index.search.choose_index`). Decoding goes through
:func:`vembed.data.images.decode_image_bytes` (the same decoder and limits as ``vembed embed``) and
ranking through :func:`vembed.index.search.search`, so the answers equal ``vembed embed`` and
``vembed search --jsonl`` for the same images. Errors are :class:`RequestError` with the HTTP status
the web layer answers with.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vembed import __version__
from vembed.data.images import EvalTransform, ImageTooLarge, decode_image_bytes
from vembed.errors import VembedError
from vembed.index.store import EmbeddingStore
from vembed.models.embedder import Embedder
from vembed.settings import IndexSettings

NO_TEXT_TOWER = "this model has no text tower: it embeds images only (send 'images')"


class RequestError(VembedError):
    """A request the server refuses: ``status`` is the HTTP status, the message its one-line error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServeOptions:
    """The server's limits and access rules (``vembed serve`` options)."""

    max_batch: int = 32  # images per forward pass, across concurrent requests
    max_wait_ms: float = 5.0  # how long the first waiting request waits for others to join it
    max_body_mb: float = 32.0  # request body limit
    max_images: int = 64  # images per /v1/embed request
    max_k: int = 1000  # results per /v1/search request
    api_key: str | None = None  # Bearer token the /v1/ routes require
    allow_root: Path | None = None  # server-side image paths are read only under this folder

    def __post_init__(self) -> None:
        if self.allow_root is not None:
            self.allow_root = Path(self.allow_root).expanduser().resolve()


@dataclass
class EmbedService:
    """A loaded model (and optionally a store) answering embed and search requests."""

    embedder: Embedder
    model_name: str
    store: EmbeddingStore | None = None
    index_settings: IndexSettings = field(default_factory=IndexSettings)
    options: ServeOptions = field(default_factory=ServeOptions)
    max_pixels: int | None = None  # data.max_image_pixels; None: the process default

    def __post_init__(self) -> None:
        self.transform = EvalTransform(self.embedder.spec)
        self.index = None
        self.method = None
        if self.store is not None:
            from vembed.index.search import choose_index

            self.index = choose_index(self.store, self.index_settings)
            self.method = "exact" if self.index is None else self.index.kind

    # -- decoding (runs in worker threads) -------------------------------------------------------
    def pixels(self, data: bytes, name: str) -> torch.Tensor:
        """``[3, H, W]`` model input for one uploaded image; 400/413 for what is not a usable image."""
        if not data:
            raise RequestError(400, f"{name}: empty file")
        try:
            image = decode_image_bytes(
                data, name, min_size=self.transform.min_decode_size, max_pixels=self.max_pixels
            )
        except ImageTooLarge as exc:
            raise RequestError(413, str(exc)) from None
        except VembedError as exc:
            raise RequestError(400, str(exc)) from None
        return self.transform(image)

    def pixels_batch(self, items: list[tuple[bytes, str]]) -> torch.Tensor:
        if not items:
            raise RequestError(400, "no images in the request")
        if len(items) > self.options.max_images:
            raise RequestError(
                413, f"{len(items)} images in one request; at most {self.options.max_images} (--max-images)"
            )
        return torch.stack([self.pixels(data, name) for data, name in items])

    def read_path(self, text: str) -> tuple[bytes, str]:
        """The bytes of a server-side image path, only inside ``--allow-root`` (403 otherwise)."""
        if "://" in text:
            raise RequestError(400, f"{text}: URLs are not fetched; send the image bytes")
        root = self.options.allow_root
        if root is None:
            raise RequestError(403, "server-side paths are not read (start the server with --allow-root DIR)")
        path = (root / text).resolve()  # an absolute path stays itself, then must lie under root
        if not path.is_relative_to(root):
            raise RequestError(403, f"{text}: outside the allowed root {root}")
        try:
            return path.read_bytes(), text
        except OSError:
            raise RequestError(404, f"{text}: no such image under {root}") from None

    # -- the model (runs in the batcher's model thread) -------------------------------------------
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embedder.encode(pixels)

    @property
    def has_text_tower(self) -> bool:
        return callable(getattr(self.embedder, "encode_text", None))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings from a dual encoder's ``encode_text(list[str]) -> [N, D]`` (the image–text
        task's models); a 400 for an image-only model."""
        if not self.has_text_tower:
            raise RequestError(400, NO_TEXT_TOWER)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise RequestError(400, "'texts' must be a non-empty list of strings")
        if len(texts) > self.options.max_images:
            raise RequestError(413, f"{len(texts)} texts in one request; at most {self.options.max_images}")
        return self.embedder.encode_text(texts).float().cpu()

    # -- search ---------------------------------------------------------------------------------
    def search(
        self, embedding: torch.Tensor, k: int, *, label: Any = None, category: str | None = None
    ) -> list[dict[str, Any]]:
        """The store's top-``k`` rows for one embedding, as ``vembed search --jsonl`` ranks and scores them.

        ``label`` / ``category`` keep only rows with that label / category (compared as text, since a
        form field is text): an exact search over those rows, or the faiss index asked for more
        neighbours until ``k`` of them pass.
        """
        from vembed.index.search import search

        store = self.store
        if store is None:
            raise RequestError(404, "no store: start the server with --store STORE to search")
        if not 1 <= k <= self.options.max_k:
            raise RequestError(422, f"k={k}: choose 1..{self.options.max_k}")
        query = embedding.reshape(1, -1)
        wanted = _row_filter(label, category)
        if wanted is None:
            scores, indices, _ = search(store, query, k, self.index_settings, index=self.index)
            return self._hits(scores[0], indices[0], k)
        if self.index is None:
            rows = [i for i, row in enumerate(store.manifest) if wanted(row)]
            if not rows:
                return []
            sub = EmbeddingStore(None, store.embeddings[rows], [store.manifest[i] for i in rows], store.meta)
            scores, indices, _ = search(sub, query, k, self.index_settings, index=None)
            mapped = torch.tensor(rows)[indices[0].clamp(min=0)].where(indices[0] >= 0, -1)
            return self._hits(scores[0], mapped, k)
        fetch = k
        while True:
            fetch = min(len(store), fetch * 4)
            scores, indices, _ = search(store, query, fetch, self.index_settings, index=self.index)
            keep = [j for j, i in enumerate(indices[0].tolist()) if i >= 0 and wanted(store.manifest[i])]
            if len(keep) >= k or fetch >= len(store):
                return self._hits(scores[0][keep], indices[0][keep], k)

    def _hits(self, scores: torch.Tensor, indices: torch.Tensor, k: int) -> list[dict[str, Any]]:
        hits = []
        for score, idx in zip(scores.tolist(), indices.tolist(), strict=True):
            if idx < 0 or len(hits) == k:
                continue
            row = self.store.manifest[idx]
            hits.append(
                {
                    "path": row["path"],
                    "label": row.get("label"),
                    "category": row.get("category"),
                    "score": round(float(score), 6),
                    "rank": len(hits) + 1,
                }
            )
        return hits

    def info(self) -> dict[str, Any]:
        embedder = self.embedder
        store = None
        if self.store is not None:
            store = {
                "path": str(self.store.path) if self.store.path is not None else None,
                "size": len(self.store),
                "dim": self.store.dim,
                "index": self.method,
            }
        return {
            "model": self.model_name,
            "dim": embedder.embed_dim,
            "pooling": embedder.pooling,
            "normalize": embedder.normalize,
            "device": str(embedder.device),
            "dtype": str(embedder.dtype).removeprefix("torch."),
            "preprocessing": embedder.spec.preprocessing(),
            "text": self.has_text_tower,
            "store": store,
            "limits": {
                "max_batch": self.options.max_batch,
                "max_wait_ms": self.options.max_wait_ms,
                "max_body_mb": self.options.max_body_mb,
                "max_images": self.options.max_images,
                "max_k": self.options.max_k,
            },
            "vembed_version": __version__,
        }


def decode_base64(text: Any, where: str) -> bytes:
    """The bytes of a base64 image in a JSON body (a ``data:...;base64,`` prefix is allowed)."""
    if not isinstance(text, str):
        raise RequestError(400, f"{where}: expected a base64 string")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: not valid base64") from None


def _row_filter(label: Any, category: str | None):
    if label in (None, "") and category in (None, ""):
        return None
    label_text = None if label in (None, "") else str(label)

    def wanted(row: dict) -> bool:
        if label_text is not None and str(row.get("label")) != label_text:
            return False
        return not (category not in (None, "") and row.get("category") != category)

    return wanted
