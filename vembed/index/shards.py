"""Embed a source into a sharded store: several processes, restartable, appendable (``vembed embed``).

The source is cut into blocks of ``shard_size`` records (:mod:`vembed.index.blocks`); process ``r`` of
``W`` embeds blocks ``b`` with ``b % W == r``, each into its own shard (``.safetensors`` + manifest
part ``.jsonl`` + a ``.done.json`` marker written last), in a job folder beside the store
(``.STORE.embedding/``). When every block has its marker, process 0 writes ``meta.json`` and moves the
job folder onto the store (or, with ``append``, the new shards into the existing store). Rerunning a
killed job with the same command embeds only the blocks that have no marker; a different source,
model or shard size refuses to mix with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import vembed.io
from vembed.console import log
from vembed.errors import VembedError
from vembed.index.blocks import iter_blocks
from vembed.index.store import (
    META_FILE,
    PROBE_FILE,
    SETTINGS_FILE,
    STORE_FORMAT,
    EmbeddingStore,
    _read_manifest,
    check_store_model,
    is_store,
    model_source,
    probe_embedding,
    read_probe,
    read_store_meta,
    store_meta,
    store_shards,
)
from vembed.inference import EmbedOptions, iter_embedding_batches
from vembed.io import atomic_path, read_json, write_json, write_jsonl, write_text
from vembed.models.embedder import Embedder

SHARD_DIR = "shards"
JOB_FILE = "job.json"
INDEX_FILES = ("index.faiss", "index.json")
MAX_PROBLEMS_KEPT = 20  # problem messages kept per shard (the count is always exact)


@dataclass
class ShardRun:
    """What one process did: blocks embedded now, blocks found done, images embedded, problems."""

    embedded: int = 0
    blocks_embedded: int = 0
    blocks_reused: int = 0
    num_blocks: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else float("nan")


def job_dir(out: str | Path) -> Path:
    """Where an unfinished embed into ``out`` keeps its shards."""
    return _beside(out, "embedding")


def _beside(out: str | Path, what: str) -> Path:
    """``.STORE.{what}`` in the store's folder."""
    out = Path(out)
    return out.parent / f".{out.name}.{what}"


def embed_shards(
    embedder: Embedder,
    source: str | Path,
    out: str | Path,
    *,
    model: str | Path,
    revision: str | None = None,
    shard_size: int = 10_000,
    append: bool = False,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    embed: EmbedOptions = EmbedOptions(),
    image_root: str | Path | None = None,
    settings_yaml: str | None = None,
    finalize: bool = True,
) -> ShardRun:
    """Embed this process' blocks of ``source`` into shards, then (process 0) assemble the store ``out``.

    ``barrier`` waits for every process (``torch.distributed.barrier`` under torchrun/accelerate).
    Process 0 holds the lock :func:`lock_file` meanwhile: a second command writing the same store is
    refused, naming the process that is writing it.
    ``finalize=False`` stops after this process' shards (the store is assembled by a later run).
    """
    out = Path(out)
    with contextlib.ExitStack() as stack:
        if rank == 0:  # one command writing the store at a time (its other processes share this one's job)
            stack.enter_context(vembed.io.process_lock(lock_file(out), what=f"store {out}"))
        start = time.perf_counter()
        exclude, part = set(), 0
        if append:
            base = _check_append_target(out, embedder, model)
            exclude = {
                row["path"] for shard in store_shards(out, base) for row in _read_manifest(shard.manifest)
            }
            part = int(base.get("parts", 1))
        elif out.exists() and not is_store(out):
            raise VembedError(f"{out} exists and is not a vembed store; refusing to replace it")
        job = job_dir(out)
        spec = {
            "source": str(Path(str(source)).expanduser().resolve()) if str(source) != "-" else "-",
            "model": model_source(model),
            "revision": revision,
            "preprocessing": embedder.spec.preprocessing(),
            "shard_size": shard_size,
            "append": append,
            "part": part,
        }
        _check_job(job, spec)
        if rank == 0:
            (job / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            if not (job / JOB_FILE).is_file():
                write_json(job / JOB_FILE, spec)
        barrier()
        try:
            run = _embed_blocks(
                embedder,
                source,
                job,
                part,
                rank,
                world_size,
                exclude,
                shard_size=shard_size,
                embed=embed,
                image_root=image_root,
            )
        except Exception:
            if world_size == 1 and not any((job / SHARD_DIR).glob("*.safetensors")):
                shutil.rmtree(job, ignore_errors=True)  # nothing embedded to resume: leave no trace
            raise
        if rank == 0 and run.blocks_reused:
            log(f"resumed: {run.blocks_reused} shard(s) were already embedded")
        barrier()
        if finalize and rank == 0:
            _finalize(job, out, spec, run.num_blocks, embedder, settings_yaml)
        barrier()
        run.seconds = time.perf_counter() - start
        return run


def lock_file(out: str | Path) -> Path:
    """The lock an embed into ``out`` holds (host and process id), beside the store."""
    return _beside(out, "lock")


def _embed_blocks(
    embedder: Embedder,
    source: str | Path,
    job: Path,
    part: int,
    rank: int,
    world_size: int,
    exclude: set[str],
    *,
    shard_size: int,
    embed: EmbedOptions,
    image_root: str | Path | None,
) -> ShardRun:
    from vembed.index.embed import check_finite

    run = ShardRun()
    blocks = iter_blocks(
        source,
        shard_size,
        owned=lambda b: b % world_size == rank and not _done_file(job, part, b).is_file(),
        image_root=image_root,
        skip_bad=embed.skip_bad,
        exclude=exclude,
    )
    for block in blocks:
        run.num_blocks = block.number + 1
        if block.records is None:
            if block.number % world_size == rank:
                _check_unchanged(job, part, block, source)
                run.blocks_reused += 1
            continue
        chunks, kept = [], []
        problems = list(block.problems)
        batches = iter_embedding_batches(embedder, block.records, embed, description=f"shard {block.number}")
        for emb, indices, bad in batches:
            check_finite(emb, [block.records[i] for i in indices])
            chunks.append(emb)
            kept += [block.records[i] for i in indices]
            problems += bad
        embeddings = torch.cat(chunks) if chunks else torch.empty(0, embedder.embed_dim)
        _write_shard(job, part, block.number, embeddings, kept, problems, block.digest)
        run.embedded += len(kept)
        run.blocks_embedded += 1
        run.skipped += len(problems)
        run.problems += problems[: max(0, MAX_PROBLEMS_KEPT - len(run.problems))]
    return run


def _check_append_target(out: Path, embedder: Embedder, model: str | Path) -> dict[str, Any]:
    """The store's meta; raises unless it was made by this model with this preprocessing."""
    if not is_store(out):
        raise VembedError(f"--append: {out} is not a vembed store (embed into it without --append first)")
    meta = read_store_meta(out)
    made_by = (meta.get("model") or {}).get("source")
    if made_by is None or _identity(made_by) != _identity(model):
        raise VembedError(
            f"{out / META_FILE}: the store was made with model {made_by}, not {model_source(model)}; "
            "--append needs the same model (embed into a new store instead)"
        )
    if (meta.get("preprocessing") or {}).get("image_size") != embedder.spec.image_size:
        raise VembedError(
            f"{out / META_FILE}: the store was made at image size {meta['preprocessing'].get('image_size')}, "
            f"the model now uses {embedder.spec.image_size}; --append needs the same preprocessing"
        )
    store = EmbeddingStore(out, torch.empty(0, int(meta["dim"])), [], meta, read_probe(out, meta))
    check_store_model(store, embedder)
    return meta


def _identity(model: str | Path) -> str:
    """The model a reference names (a run directory names its final/), by the loader's one rule."""
    from vembed.models.loader import resolve_ref

    try:
        return model_source(resolve_ref(model).name)
    except VembedError:  # a folder that is gone: compare what was written
        return model_source(model)


def _check_job(job: Path, spec: dict[str, Any]) -> None:
    found = read_json(job / JOB_FILE)
    if found is None or found == spec:
        return
    changed = [key for key in spec if found.get(key) != spec[key]]
    raise VembedError(
        f"{job / JOB_FILE}: an unfinished embed with a different {', '.join(changed)} is there; rerun it with "
        f"the same command to finish it, or delete {job} to start over"
    )


def _stem(job: Path, part: int, number: int) -> Path:
    return job / SHARD_DIR / f"p{part:03d}-{number:06d}"


def _done_file(job: Path, part: int, number: int) -> Path:
    return _stem(job, part, number).with_suffix(".done.json")


def _check_unchanged(job: Path, part: int, block, source) -> None:
    """A block embedded before (by a killed run) must still hold the same items."""
    found = (read_json(_done_file(job, part, block.number)) or {}).get("digest")
    if found and found != block.digest:
        raise VembedError(
            f"{source}: block {block.number} (shard {_stem(job, part, block.number).name}) is not what the "
            f"unfinished embed in {job} embedded: the source changed since; rerun with the source as it was, "
            f"or delete {job} to start over"
        )


def _write_shard(
    job: Path, part: int, number: int, embeddings, records, problems: list[str], digest: str = ""
) -> None:
    """The shard's embeddings and manifest part, then its marker (a shard without marker is redone)."""
    stem = _stem(job, part, number)
    if len(records):
        with atomic_path(stem.with_suffix(".safetensors")) as tmp:
            save_file(
                {"embeddings": embeddings.float().contiguous()}, str(tmp), metadata={"format": STORE_FORMAT}
            )
        rows = (
            {"path": str(r.image.expanduser().resolve()), "label": r.label, "category": r.category}
            for r in records
        )
        write_jsonl(stem.with_suffix(".jsonl"), rows)
    marker = {
        "count": len(records),
        "skipped": len(problems),
        "problems": problems[:MAX_PROBLEMS_KEPT],
        "digest": digest,
    }
    write_json(_done_file(job, part, number), marker)


def _finalize(job: Path, out: Path, spec: dict, num_blocks: int, embedder: Embedder, settings_yaml) -> None:
    """Check every block has its shard, then write meta.json and put the shards in place."""
    part = spec["part"]
    missing = [b for b in range(num_blocks) if not _done_file(job, part, b).is_file()]
    if missing:
        shown = ", ".join(str(b) for b in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise VembedError(
            f"{job}: {len(missing)} shard(s) not embedded yet (blocks {shown}); rerun the same command to embed them"
        )
    entries, skipped = [], 0
    for b in range(num_blocks):
        marker = read_json(_done_file(job, part, b))
        skipped += int(marker.get("skipped", 0))
        if marker["count"]:
            stem = _stem(job, part, b).relative_to(job)
            entries.append(
                {
                    "embeddings": str(stem.with_suffix(".safetensors")),
                    "manifest": str(stem.with_suffix(".jsonl")),
                    "count": int(marker["count"]),
                }
            )
    if spec["append"]:
        _finish_append(job, out, entries, skipped)
        return
    count = sum(e["count"] for e in entries)
    if count == 0:
        raise VembedError(f"{spec['source']}: no image could be embedded; the store would be empty")
    meta = _meta(embedder, spec, entries, count, skipped)
    with atomic_path(job / PROBE_FILE) as tmp:
        save_file({"probe": probe_embedding(embedder).float().contiguous()}, str(tmp))
    if settings_yaml is not None:
        write_text(job / SETTINGS_FILE, settings_yaml)
    write_json(job / META_FILE, meta)
    vembed.io.make_readable(job)  # (through the module: the reliability tests interrupt here)
    vembed.io.replace_dir(job, out)
    (out / JOB_FILE).unlink()  # only now: until the swap, a rerun must still match the job


def _meta(embedder: Embedder, spec: dict, entries: list[dict], count: int, skipped: int) -> dict[str, Any]:
    meta = store_meta(
        embedder, model=spec["model"], revision=spec["revision"], count=count, source=spec["source"]
    )
    meta["preprocessing"] = spec["preprocessing"]
    meta.update(
        num_skipped=skipped,
        shard_size=spec["shard_size"],
        parts=spec["part"] + 1,
        shards=entries,
    )
    return meta


def _finish_append(job: Path, out: Path, entries: list[dict], skipped: int) -> None:
    """Move the new shards into the store, then extend its meta.json (the commit point)."""
    meta = read_store_meta(out)
    if "shards" not in meta:  # a version-1 store: its one file pair becomes the first shard
        probe = read_probe(out, meta)
        if probe is not None:
            with atomic_path(out / PROBE_FILE) as tmp:
                save_file({"probe": probe.float().contiguous()}, str(tmp))
        meta["shards"] = [
            {"embeddings": "embeddings.safetensors", "manifest": "manifest.jsonl", "count": meta["count"]}
        ]
    (out / SHARD_DIR).mkdir(exist_ok=True)
    for entry in entries:
        for key in ("embeddings", "manifest"):
            if (job / entry[key]).exists():
                os.replace(job / entry[key], out / entry[key])
    added = sum(e["count"] for e in entries)
    if added:
        for name in INDEX_FILES:  # the index no longer covers the store
            if (out / name).exists():
                (out / name).unlink()
                log(f"removed the out-of-date {name}; rebuild it with `vembed index build {out}`")
    meta.update(
        shards=meta["shards"] + entries,
        count=meta["count"] + added,
        num_skipped=int(meta.get("num_skipped", 0)) + skipped,
        parts=int(meta.get("parts", 1)) + 1,
        updated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_json(out / META_FILE, meta)
    shutil.rmtree(job, ignore_errors=True)
    log(f"appended {added} images to {out} ({meta['count']} in all)")
