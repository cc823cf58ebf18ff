"""Text queries: captions → the store's dual encoder's text tower → nearest images in the store.

A store remembers (``meta.json: model.text_tower``) whether its images were embedded by a dual encoder's
image tower — the space its text tower maps captions into; any other store refuses text queries.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vembed.errors import VembedError
from vembed.index.search import Query, SearchReport, search_queries
from vembed.index.store import EmbeddingStore, check_store_model, model_arguments
from vembed.settings import Settings

__all__ = ["read_texts", "search_texts", "stream_text_jsonl", "text_encoder_for_store"]


def read_texts(source: str | Path) -> list[str]:
    """One text a line from a file, or from stdin for ``-``; blank lines skipped."""
    if str(source) == "-":
        lines = sys.stdin.read().splitlines()
        where = "stdin"
    else:
        path = Path(source)
        if not path.is_file():
            raise VembedError(f"{path}: no such text file (one text a line, or - for stdin)")
        lines = path.read_text(encoding="utf-8").splitlines()
        where = str(path)
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise VembedError(f"{where}: no text (one text a line)")
    return texts


def text_encoder_for_store(store: EmbeddingStore, settings: Settings):
    """The dual encoder whose image tower made ``store`` (checked with the store's probe)."""
    from vembed.models.dual import load_dual_encoder

    model = store.meta.get("model") or {}
    if not model.get("text_tower"):
        raise VembedError(
            f"{store.path}: its model ({model.get('source', '?')}) has no text tower, so the store cannot "
            "answer text queries; embed the images with a dual encoder (a run of train.task=image_text)"
        )
    args = model_arguments(store)
    m = settings.model
    encoder = load_dual_encoder(
        args["model"], revision=args["revision"], device=m.device, dtype=m.dtype, attention=m.attention
    )
    check_store_model(store, encoder)
    return encoder


def search_texts(
    store: EmbeddingStore, texts: list[str], settings: Settings | None = None, *, k: int | None = None
) -> SearchReport:
    """The top-``k`` store images of each text (``index.k`` by default)."""
    settings = settings or Settings()
    if not texts:
        raise VembedError("no text queries given")
    encoder = text_encoder_for_store(store, settings)
    vectors = encoder.encode_text(texts, batch_size=settings.index.batch_size)
    queries = [Query(text, embedding=vector) for text, vector in zip(texts, vectors, strict=True)]
    return search_queries(store, queries, settings, k=k, show_progress=False)


def stream_text_jsonl(model, texts: list[str], out, settings: Settings | None = None) -> int:
    """Write ``{"text": ..., "embedding": [...]}`` lines of ``model``'s text tower to ``out``; the width."""
    import json

    from vembed.evaluation.image_text import dual_encoder_for

    settings = settings or Settings()
    encoder = dual_encoder_for(model, settings)
    vectors = encoder.encode_text(texts, batch_size=settings.index.batch_size)
    for text, vector in zip(texts, vectors.tolist(), strict=True):
        out.write(json.dumps({"text": text, "embedding": vector}, ensure_ascii=False) + "\n")
    out.flush()
    return encoder.embed_dim
