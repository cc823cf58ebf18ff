"""An on-disk cache of labelled embeddings, keyed by the model and the content of the records file.

The key hashes: the model reference and, for a local folder, the name, size and modification time of
each of its files; the model settings (pooling, projection, image size, truncation, dtype ...); the
bytes of the records file; and the resolved path, size and modification time of every image it names.
Changing any of them (retraining into the same folder, editing the JSONL, replacing an image) makes a
new key, so a stale entry is never read. Hub models are keyed by id and ``model.revision``.

Entries are single safetensors files written atomically, so concurrent probes never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vembed.console import log
from vembed.data.records import RecordSet
from vembed.evaluation.base import EmbedOptions, LabelledEmbeddings, embed_labelled
from vembed.io import atomic_path
from vembed.models.embedder import Embedder
from vembed.settings import ModelSettings

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$VEMBED_CACHE_DIR``, else ``$XDG_CACHE_HOME/vembed/embeddings`` (``~/.cache/vembed/embeddings``)."""
    if os.environ.get("VEMBED_CACHE_DIR"):
        return Path(os.environ["VEMBED_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vembed" / "embeddings"


def model_identity(model: str | Path) -> dict:
    """What identifies a model's weights: a folder's files (name, size, mtime), else the reference."""
    from vembed.models.loader import resolve_ref

    ref = resolve_ref(model)
    if ref.folder is None:
        return {"ref": ref.name}
    path = ref.folder
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return {
        "folder": str(path.resolve()),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def cache_key(
    model: str | Path, settings: ModelSettings | None, records: RecordSet, *, skip_bad: bool
) -> str:
    """A hex digest of everything the embeddings of ``records`` depend on (see the module docstring)."""
    settings = settings or ModelSettings()
    digest = hashlib.sha256()
    head = {
        "version": CACHE_VERSION,
        "model": model_identity(model),
        "settings": settings.model_dump(mode="json", exclude={"name"}),
        "skip_bad": skip_bad,
    }
    digest.update(json.dumps(head, sort_keys=True).encode())
    if records.path is not None:
        digest.update(records.path.read_bytes())
    for rec in records.images():
        path = Path(rec.image).expanduser().resolve()
        stat = path.stat() if path.is_file() else None
        digest.update(
            f"\n{path}\t{stat.st_size if stat else -1}\t{stat.st_mtime_ns if stat else -1}".encode()
        )
    return digest.hexdigest()[:32]


class EmbeddingCache:
    """Labelled embeddings on disk under ``folder/<key>.safetensors``."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str) -> LabelledEmbeddings | None:
        """The entry for ``key``, or None (missing or unreadable: it is then recomputed)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            embeddings = load_file(str(path))["embeddings"]
            labels = json.loads(meta["labels"])
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            log(f"[yellow]ignoring unreadable cache entry {path}[/] ({exc})")
            return None
        return LabelledEmbeddings(
            embeddings, labels, meta.get("source", ""), json.loads(meta.get("problems", "[]"))
        )

    def save(self, key: str, data: LabelledEmbeddings) -> Path:
        meta = {
            "labels": json.dumps(data.labels),
            "source": data.source,
            "problems": json.dumps(data.problems),
        }
        with atomic_path(self.path(key)) as tmp:
            save_file({"embeddings": data.embeddings.contiguous()}, str(tmp), metadata=meta)
        return self.path(key)


def embed_cached(
    model: str | Path,
    settings: ModelSettings | None,
    records: RecordSet,
    options: EmbedOptions,
    cache: EmbeddingCache | None,
    get_embedder: Callable[[], Embedder],
    *,
    description: str = "embedding",
) -> tuple[LabelledEmbeddings, bool]:
    """``(embeddings, from_cache)``: the cached entry, else embed with ``get_embedder()`` and store it.

    ``get_embedder`` is only called on a miss, so a probe whose splits are all cached never loads the
    model.
    """
    if cache is None:
        return embed_labelled(get_embedder(), records, options, description=description), False
    key = cache_key(model, settings, records, skip_bad=options.skip_bad)
    hit = cache.load(key)
    if hit is not None:
        hit.source = str(records.path)
        return hit, True
    data = embed_labelled(get_embedder(), records, options, description=description)
    cache.save(key, data)
    return data, False
