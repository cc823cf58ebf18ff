"""The on-disk embedding store: a folder that ``vembed embed --out`` writes and ``vembed search`` reads.

::

    store/
      embeddings.safetensors   "embeddings": float32 [N, D]; "probe": [1, D] (see below)
      manifest.jsonl           row i describes embeddings[i]: {"path": ..., "label": ..., "category": ...}
      meta.json                model, pooling, dim, normalisation, preprocessing, vembed version, ...
      index.faiss, index.json  optional faiss index (``vembed index build``)

A sharded store (``vembed embed``, :mod:`vembed.index.shards`) keeps the same rows in parts instead:
``shards/p000-000000.safetensors`` + ``.jsonl`` ..., listed in order by ``meta.json["shards"]``, with
the probe in ``probe.safetensors``; its rows are the shards' rows, concatenated in that order. Files
not listed in ``meta.json`` are not part of the store (``meta.json`` is written last).

The folder is written as a whole (temp folder, then rename), so a reader sees the old store or the
new one, never a mix. ``meta.json`` records how to rebuild the model that made the embeddings; the
``probe`` is that model's embedding of a fixed synthetic input, so a model folder that changed since
(retrained in place, a random projection) is caught before it returns meaningless neighbours.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vembed import __version__
from vembed.data.records import ImageRecord, json_object
from vembed.errors import VembedError
from vembed.io import atomic_dir, read_json, text_lines, write_json, write_jsonl, write_text
from vembed.models.dual import embeds_for_text
from vembed.models.embedder import Embedder
from vembed.models.registry import REGISTRY

STORE_FORMAT = "vembed-store"
STORE_VERSION = 2  # 2: sharded stores ("shards" in meta.json); version 1 stores read as one shard
EMBEDDINGS_FILE = "embeddings.safetensors"
MANIFEST_FILE = "manifest.jsonl"
META_FILE = "meta.json"
SETTINGS_FILE = "settings.yaml"
PROBE_FILE = "probe.safetensors"
# The model rebuilt from meta.json must embed the probe input this close to the stored probe.
PROBE_MIN_COSINE = 0.99


@dataclass
class EmbeddingStore:
    """Embeddings, one manifest row per embedding, and the metadata that says how they were made."""

    path: Path | None
    embeddings: torch.Tensor  # [N, D] float32
    manifest: list[dict[str, Any]]  # {"path": str, "label": int | str | None, "category": str | None}
    meta: dict[str, Any]
    probe: torch.Tensor | None = None  # [1, D]: the model's embedding of probe_input()
    problems: list[str] = field(default_factory=list)  # images skipped while embedding

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def paths(self) -> list[str]:
        return [row["path"] for row in self.manifest]

    @property
    def labels(self) -> list[Any]:
        return [row.get("label") for row in self.manifest]


def model_source(name: str | Path) -> str:
    """How to find a model again later: a registry name or hub id as given, a local folder absolute."""
    text = str(name)
    if text in REGISTRY:
        return text
    path = Path(text).expanduser()
    return str(path.resolve()) if path.is_dir() else text


def probe_input(embedder: Embedder) -> torch.Tensor:
    """A fixed synthetic image tensor ``[1, 3, S, S]`` (smooth ramps), the same on every machine."""
    size = embedder.spec.image_size
    ramp = torch.linspace(-1.5, 1.5, size)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    return torch.stack([xx, yy, (xx * yy).sin()]).unsqueeze(0)


def probe_embedding(embedder: Embedder) -> torch.Tensor:
    return embedder.encode(probe_input(embedder))


def store_meta(
    embedder: Embedder, *, model: str | Path, revision: str | None, count: int, source: str
) -> dict[str, Any]:
    """``meta.json`` of a store of ``count`` embeddings made by ``embedder`` (how to rebuild it)."""
    spec = embedder.spec
    return {
        "format": STORE_FORMAT,
        "format_version": STORE_VERSION,
        "vembed_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "count": count,
        "dim": embedder.embed_dim,
        "dtype": "float32",
        "normalize": embedder.normalize,
        "model": {
            "source": model_source(model),
            "revision": revision,
            "family": spec.family,
            "pooling": embedder.pooling,
            "projection_dim": embedder.projection.out_features if embedder.projection is not None else None,
            "normalize": embedder.normalize,
            "truncate_dim": embedder.truncate_dim,
            "text_tower": embeds_for_text(embedder, model),  # text queries allowed (vembed.index.text_search)
        },
        "preprocessing": spec.preprocessing(),
        "source": source,
        "num_skipped": 0,
    }


def build_store(
    embedder: Embedder,
    embeddings: torch.Tensor,
    records: list[ImageRecord],
    *,
    model: str | Path,
    revision: str | None = None,
    source: str = "",
    problems: list[str] | None = None,
) -> EmbeddingStore:
    """An in-memory store for ``embeddings`` (row i ↔ ``records[i]``) made by ``embedder``."""
    if len(embeddings) != len(records):
        raise VembedError(f"{len(embeddings)} embeddings but {len(records)} records")
    if len(records) == 0:
        raise VembedError(f"{source or 'source'}: no image could be embedded; the store would be empty")
    meta = store_meta(embedder, model=model, revision=revision, count=len(records), source=source)
    meta["dim"] = int(embeddings.shape[1])
    meta["num_skipped"] = len(problems or [])
    manifest = [
        {"path": str(Path(rec.image).expanduser().resolve()), "label": rec.label, "category": rec.category}
        for rec in records
    ]
    return EmbeddingStore(
        None,
        embeddings.detach().float().cpu().contiguous(),
        manifest,
        meta,
        probe_embedding(embedder),
        list(problems or []),
    )


def write_store(
    store: EmbeddingStore, path: str | Path, *, overwrite: bool = True, settings_yaml: str | None = None
) -> Path:
    """Write ``store`` as a folder at ``path``, atomically; an existing store there is replaced whole.

    A folder that exists and is not a vembed store is never replaced (it may be the user's data).
    ``settings_yaml`` (the resolved settings that made it) is written beside, as ``settings.yaml``.
    """
    path = Path(path)
    if path.exists():
        if not is_store(path):
            raise VembedError(f"{path} exists and is not a vembed store; refusing to replace it")
        if not overwrite:
            raise VembedError(f"{path}: a store already exists there")
    tensors = {"embeddings": store.embeddings.float().contiguous()}
    if store.probe is not None:
        tensors["probe"] = store.probe.float().contiguous()
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / EMBEDDINGS_FILE), metadata={"format": STORE_FORMAT})
        write_jsonl(tmp / MANIFEST_FILE, store.manifest)
        write_json(tmp / META_FILE, store.meta)
        if settings_yaml is not None:
            write_text(tmp / SETTINGS_FILE, settings_yaml)
    store.path = path
    return path


def is_store(path: str | Path) -> bool:
    """True when ``path`` is a folder with a vembed store's ``meta.json``."""
    meta = Path(path) / META_FILE
    if not meta.is_file():
        return False
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError):
        return False
    return isinstance(data, dict) and data.get("format") == STORE_FORMAT


def open_store(path: str | Path) -> EmbeddingStore:
    """Read and check a store folder (all shards, in order); every problem names the file that is wrong."""
    path = Path(path)
    meta = read_store_meta(path)
    chunks, manifest = [], []
    for shard in store_shards(path, meta):
        embeddings = read_shard_embeddings(shard)
        rows = _read_manifest(shard.manifest)
        if len(rows) != len(embeddings):
            raise VembedError(
                f"{shard.manifest}: {len(rows)} rows but {shard.embeddings.name} holds {len(embeddings)} embeddings"
            )
        if chunks and embeddings.shape[1] != chunks[0].shape[1]:
            raise VembedError(
                f"{shard.embeddings}: {embeddings.shape[1]}-d, the first shard {chunks[0].shape[1]}-d"
            )
        chunks.append(embeddings)
        manifest += rows
    embeddings = torch.cat(chunks) if len(chunks) != 1 else chunks[0]
    if meta.get("dim") not in (None, embeddings.shape[1]):
        raise VembedError(
            f"{path / META_FILE}: dim {meta['dim']} but the embeddings are {embeddings.shape[1]}-d"
        )
    return EmbeddingStore(path, embeddings.float(), manifest, meta, read_probe(path, meta))


@dataclass(frozen=True)
class Shard:
    """One part of a store: embeddings file, its manifest part, and the row count meta.json records."""

    embeddings: Path
    manifest: Path
    count: int | None = None


def read_store_meta(path: str | Path) -> dict[str, Any]:
    """A store's ``meta.json``, checked (without reading any embeddings)."""
    path = Path(path)
    if not path.is_dir():
        raise VembedError(f"store not found: {path} (create one with `vembed embed SOURCE --out {path}`)")
    return _read_meta(path / META_FILE)


def store_shards(path: str | Path, meta: dict[str, Any] | None = None) -> list[Shard]:
    """The store's shards in row order (a version-1 store is one shard)."""
    path = Path(path)
    meta = read_store_meta(path) if meta is None else meta
    if "shards" not in meta:
        return [Shard(path / EMBEDDINGS_FILE, path / MANIFEST_FILE)]
    where = path / META_FILE
    if not isinstance(meta["shards"], list) or not meta["shards"]:
        raise VembedError(
            f"{where}: 'shards' lists no shard files (the store is incomplete or hand-edited); "
            "re-run `vembed embed` to rebuild it"
        )
    shards = []
    for i, entry in enumerate(meta["shards"]):
        names = [entry.get(key) for key in ("embeddings", "manifest")] if isinstance(entry, dict) else []
        if len(names) != 2 or not all(isinstance(name, str) and name.strip() for name in names):
            raise VembedError(f"{where}: shards[{i}] needs 'embeddings' and 'manifest' file names")
        count = entry.get("count")
        if count is not None and not _is_count(count):
            raise VembedError(
                f"{where}: shards[{i}].count must be a row count (an integer >= 0), got {count!r}"
            )
        shards.append(Shard(path / names[0], path / names[1], count))
    return shards


def read_shard_embeddings(shard: Shard) -> torch.Tensor:
    """The ``[n, D]`` float32 embeddings of one shard."""
    if not shard.embeddings.is_file():
        raise VembedError(f"{shard.embeddings}: missing (the store is incomplete)")
    try:
        tensors = load_file(str(shard.embeddings))
    except (SafetensorError, OSError) as exc:
        raise VembedError(f"{shard.embeddings}: cannot read ({exc})") from None
    embeddings = tensors.get("embeddings")
    if embeddings is None or embeddings.ndim != 2:
        raise VembedError(f"{shard.embeddings}: no 2-D 'embeddings' tensor")
    if shard.count is not None and len(embeddings) != shard.count:
        raise VembedError(f"{shard.embeddings}: {len(embeddings)} rows, meta.json says {shard.count}")
    return embeddings.float()


def read_shard_rows(shard: Shard) -> list[dict[str, Any]]:
    """The manifest rows of one shard (``{"path", "label", "category"}``), checked."""
    return _read_manifest(shard.manifest)


def iter_store_rows(path: str | Path) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, embeddings)`` shard by shard: one shard in memory at a time."""
    start = 0
    for shard in store_shards(path):
        embeddings = read_shard_embeddings(shard)
        yield start, embeddings
        start += len(embeddings)


def store_summary(path: str | Path) -> dict[str, Any]:
    """Count, dim, shards and labelled rows of a store, read without loading its embeddings."""
    path = Path(path)
    meta = read_store_meta(path)
    shards = store_shards(path, meta)
    labelled = count = 0
    for shard in shards:
        rows = _read_manifest(shard.manifest)
        count += len(rows)
        labelled += sum(row.get("label") is not None for row in rows)
    if meta.get("count") not in (None, count):
        raise VembedError(f"{path / META_FILE}: count {meta['count']} but the manifest has {count} rows")
    return {
        "meta": meta,
        "count": count,
        "dim": _dim(meta, path),
        "shards": len(shards),
        "labelled": labelled,
    }


def read_probe(path: Path, meta: dict[str, Any]) -> torch.Tensor | None:
    file = path / (PROBE_FILE if "shards" in meta else EMBEDDINGS_FILE)
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as fh:
            return fh.get_tensor("probe") if "probe" in fh.keys() else None  # noqa: SIM118 (no __contains__)
    except (SafetensorError, OSError) as exc:
        raise VembedError(f"{file}: cannot read ({exc})") from None


def model_arguments(store: EmbeddingStore) -> dict[str, Any]:
    """The :func:`~vembed.models.factory.load_embedder` arguments that rebuild the store's model."""
    model = store.meta.get("model") or {}
    if not model.get("source"):
        raise VembedError(f"{_where(store)}: 'model.source' is missing; cannot rebuild the model")
    pre = store.meta.get("preprocessing") or {}
    expected = [(model, "model", key, str) for key in ("source", "revision", "pooling")]
    expected += [(model, "model", key, int) for key in ("projection_dim", "truncate_dim")]
    expected += [(model, "model", "normalize", bool), (pre, "preprocessing", "image_size", int)]
    for section, name, key, kind in expected:
        value = section.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise VembedError(
                f"{_where(store)}: '{name}.{key}' must be {_KIND_NAMES[kind]}, got {value!r}; "
                "re-run `vembed embed` to rebuild the store"
            )
    return {
        "model": model["source"],
        "revision": model.get("revision"),
        "pooling": model.get("pooling"),
        "projection_dim": model.get("projection_dim"),
        "normalize": bool(model.get("normalize", True)),
        "truncate_dim": model.get("truncate_dim"),
        "image_size": pre.get("image_size"),
    }


_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


def embedder_for_store(
    store: EmbeddingStore, *, device: str = "auto", dtype: str = "auto", attention: str = "auto"
) -> Embedder:
    """Rebuild the model that made ``store`` and check it still embeds the way it did."""
    from vembed.models.factory import load_embedder

    embedder = load_embedder(**model_arguments(store), device=device, dtype=dtype, attention=attention)
    check_store_model(store, embedder)
    return embedder


def check_store_model(store: EmbeddingStore, embedder: Embedder) -> None:
    """Raise when ``embedder`` is not the model (and preprocessing) the store was made with."""
    where = _where(store)
    if embedder.embed_dim != store.dim:
        raise VembedError(
            f"{where}: the model gives {embedder.embed_dim}-d embeddings, the store holds {store.dim}-d"
        )
    pre = store.meta.get("preprocessing") or {}
    spec = embedder.spec
    now = {"mean": list(spec.mean), "std": list(spec.std), "crop_pct": spec.crop_pct, "resize": spec.resize}
    for key, value in now.items():
        if key in pre and not _close(pre[key], value):
            raise VembedError(
                f"{where}: preprocessing '{key}' was {pre[key]} when the store was made, "
                f"the model at {store.meta['model']['source']} now says {value}"
            )
    if store.probe is not None:
        cosine = torch.nn.functional.cosine_similarity(probe_embedding(embedder), store.probe.float()).item()
        if cosine < PROBE_MIN_COSINE:
            raise VembedError(
                f"{where}: the model at {store.meta['model']['source']} no longer embeds the way it did when "
                f"this store was made (probe cosine {cosine:.3f}); was it retrained in place, or does it "
                "have an untrained projection? Re-run `vembed embed` to rebuild the store"
            )


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-6
    return a == b


def _where(store: EmbeddingStore) -> str:
    return str(store.path / META_FILE) if store.path is not None else "store"


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise VembedError(f"{path.parent} is not a vembed store (no {META_FILE})")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise VembedError(f"{path}: not a vembed store's meta file ('format' is not {STORE_FORMAT!r})")
    version = meta.get("format_version", 0)
    if not _is_count(version):
        raise VembedError(f"{path}: 'format_version' must be an integer, got {version!r}")
    if version > STORE_VERSION:
        raise VembedError(
            f"{path}: store format {meta['format_version']} is newer than this vembed reads "
            f"({STORE_VERSION}); upgrade vembed"
        )
    for key in ("count", "dim", "num_skipped", "parts"):
        if meta.get(key) is not None and not _is_count(meta[key]):
            raise VembedError(f"{path}: '{key}' must be an integer >= 0, got {meta[key]!r}")
    for key in ("model", "preprocessing"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise VembedError(f"{path}: '{key}' must be an object, got {type(meta[key]).__name__}")
    return meta


def _dim(meta: dict[str, Any], path: Path) -> int:
    if meta.get("dim") is None:
        raise VembedError(f"{path / META_FILE}: 'dim' is missing; re-run `vembed embed` to rebuild the store")
    return int(meta["dim"])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise VembedError(f"{path}: missing (the store is incomplete)")
    rows = []
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        row = json_object(line)
        if isinstance(row, str):
            raise VembedError(f"{path}:{lineno}: {row}")
        if not isinstance(row.get("path"), str):
            raise VembedError(f"{path}:{lineno}: expected an object with a 'path' string")
        label, category = row.get("label"), row.get("category")
        if not (label is None or (isinstance(label, (int, str)) and not isinstance(label, bool))):
            raise VembedError(f"{path}:{lineno}: 'label' must be an integer or a string, got {label!r}")
        if not (category is None or isinstance(category, str)):
            raise VembedError(f"{path}:{lineno}: 'category' must be a string, got {category!r}")
        rows.append(row)
    return rows
