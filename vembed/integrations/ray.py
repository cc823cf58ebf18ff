"""Batch embedding on Ray Data: the same model and preprocessing on a cluster as on a laptop.

Two callables for ``Dataset.map_batches``:

- :class:`DecodeImages` (or the function :func:`decode_batch`, for tasks: CPU, stateless) reads each row's image file with vembed's decoder
  and eval transform → a ``pixel_values`` column (float32 ``[B, 3, S, S]``);
- :class:`VembedEmbedder` (actors: loads the model once per actor, on its GPU when Ray gives it one)
  turns ``pixel_values`` (or, in one stage, ``path``) into an ``embedding`` column (float32 ``[B, D]``).

::

    import ray
    from vembed.integrations.ray import DecodeImages, VembedEmbedder

    ds = ray.data.read_parquet("listing.parquet")            # a "path" column (and any others)
    ds = ds.map_batches(DecodeImages, fn_constructor_kwargs={"model": "models/shoes"}, batch_size=64)
    ds = ds.map_batches(VembedEmbedder, fn_constructor_kwargs={"model": "models/shoes"},
                        concurrency=4, num_gpus=1, batch_size=64)
    ds.write_parquet("embeddings.parquet")

:func:`embed_with_ray` is that pipeline behind ``vembed embed SOURCE --engine ray --out DIR.parquet``
(or ``--out DB/TABLE.lance`` for a LanceDB table).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vembed.errors import VembedError
from vembed.extras import require

PATH_COLUMNS = ("path", "image")


def _paths(batch: dict[str, Any], root: str | None) -> list[str]:
    column = next((c for c in PATH_COLUMNS if c in batch), None)
    if column is None:
        raise VembedError(
            f"the batch has no image path column ({' or '.join(PATH_COLUMNS)}): {sorted(batch)}"
        )
    paths = [str(p) for p in batch[column]]
    if root is not None:
        paths = [str(Path(root) / p) if not Path(p).is_absolute() else p for p in paths]
    return paths


class DecodeImages:
    """``map_batches`` callable: image paths → ``pixel_values`` with the model's eval preprocessing.

    ``model`` is any model reference (only its preprocessing is read: no weights load);
    ``image_size`` overrides it as ``model.image_size`` does. ``skip_bad`` drops rows whose image does
    not decode (and counts them in an ``_bad`` note on stderr) instead of failing the job.
    """

    def __init__(
        self, model: str, *, image_size: int | None = None, revision: str | None = None,
        image_root: str | None = None, skip_bad: bool = False, max_pixels: int | None = None,
    ):  # fmt: skip
        from vembed.data.images import EvalTransform
        from vembed.models.loader import load_spec

        spec = load_spec(model, revision=revision)
        if image_size:
            spec = spec.replace(image_size=image_size)
        self.transform = EvalTransform(spec)
        self.root = image_root
        self.skip_bad = skip_bad
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return _decode(batch, self.transform, self.root, self.skip_bad, self.max_pixels)


def decode_batch(
    batch: dict[str, Any], *, spec, image_root: str | None = None, skip_bad: bool = False,
    max_pixels: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """:class:`DecodeImages` as a plain function of a ``ModelSpec`` (``map_batches`` runs it in tasks)."""
    from vembed.data.images import EvalTransform

    return _decode(batch, EvalTransform(spec), image_root, skip_bad, max_pixels)


def _decode(batch, transform, root, skip_bad, max_pixels) -> dict[str, Any]:
    from vembed.data.images import load_image

    pixels, keep = [], []
    for i, path in enumerate(_paths(batch, root)):
        try:
            image = load_image(path, min_size=transform.min_decode_size, max_pixels=max_pixels)
        except VembedError as exc:
            if not skip_bad:
                raise
            import sys

            print(f"vembed: skipped {exc}", file=sys.stderr)
            continue
        pixels.append(transform(image).numpy())
        keep.append(i)
    out = {key: np.asarray(value)[keep] for key, value in batch.items()}
    size = transform.size
    out["pixel_values"] = np.stack(pixels) if pixels else np.empty((0, 3, size, size), np.float32)
    return out


class VembedEmbedder:
    """``map_batches`` callable class: the model loads once per actor; adds an ``embedding`` column.

    Keyword arguments are :func:`~vembed.models.factory.load_embedder`'s (``device="auto"`` takes the
    GPU Ray assigned to the actor, ``dtype="auto"`` bf16 where it is native). Rows come with
    ``pixel_values`` (from :class:`DecodeImages`) or with a ``path`` column, decoded here.
    """

    def __init__(self, model: str, *, image_root: str | None = None, skip_bad: bool = False, **load_kwargs):
        from vembed.models.factory import load_embedder

        self.embedder = load_embedder(model, **load_kwargs)
        self.decode = None
        self.model = model
        self.image_root, self.skip_bad = image_root, skip_bad

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        if "pixel_values" not in batch:
            if self.decode is None:
                self.decode = DecodeImages(
                    self.model, image_size=self.embedder.spec.image_size, image_root=self.image_root,
                    skip_bad=self.skip_bad,
                )  # fmt: skip
            batch = self.decode(batch)
        pixels = torch.from_numpy(np.ascontiguousarray(batch.pop("pixel_values"), dtype=np.float32))
        if len(pixels) and pixels.shape[-1] != self.embedder.spec.image_size:
            raise VembedError(
                f"pixel_values are {pixels.shape[-1]} px; {self.model} takes {self.embedder.spec.image_size} px "
                "(decode with the same model and image_size)"
            )
        width = self.embedder.embed_dim
        embeddings = self.embedder.encode(pixels).numpy() if len(pixels) else np.empty((0, width), np.float32)
        return {**batch, "embedding": embeddings.astype(np.float32)}


@dataclass
class RayEmbedRun:
    out: str
    rows: int
    seconds: float
    dim: int
    problems: list[str]

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


def output_kind(out: str) -> str:
    """``parquet`` for ``DIR.parquet``, ``lance`` for ``DB/TABLE.lance``; anything else is refused."""
    text = out.rstrip("/")
    if text.endswith(".parquet"):
        return "parquet"
    if text.endswith(".lance"):
        return "lance"
    raise VembedError(
        f"--engine ray --out {out}: give DIR.parquet (a Parquet folder) or DB/TABLE.lance (a LanceDB table); "
        "a vembed store is written by the default engine"
    )


def embed_with_ray(
    source: str, out: str, *, model: str, load_kwargs: dict, batch_size: int = 64, actors: int = 1,
    gpus_per_actor: float | None = None, image_root: str | None = None, skip_bad: bool = False,
    max_pixels: int | None = None, num_cpus: int | None = None,
) -> RayEmbedRun:  # fmt: skip
    """Read ``source`` (a folder, records JSONL, an image, ``-``, or a Parquet listing with a ``path`` /
    ``image`` column), decode in Ray tasks, embed in ``actors`` actors, write ``out`` in listing order.

    Joins the Ray cluster ``RAY_ADDRESS`` names (or starts a local one with ``num_cpus``).
    """
    require("ray.data", "ray", what="vembed embed --engine ray")
    ray = require("ray", "ray", what="vembed embed --engine ray")

    kind = output_kind(out)
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, log_to_driver=False, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    problems: list[str] = []
    if str(source).endswith(".parquet"):
        ds = ray.data.read_parquet(str(source))
        label_type = None
    else:
        from vembed.index.sources import records_from_source

        records, problems = records_from_source(source, image_root=image_root, skip_bad=skip_bad)
        if not records:
            raise VembedError(f"{source}: no images to embed")
        items = [{"path": str(r.decode_path), "label": r.label, "category": r.category} for r in records]
        label_type = (
            "int64" if all(isinstance(r.label, int) or r.label is None for r in records) else "string"
        )
        ds = ray.data.from_items(items)
        image_root = None  # the records' paths are resolved already
    if gpus_per_actor is None:
        gpus_per_actor = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    start = time.perf_counter()
    from vembed.models.loader import load_spec

    spec = load_spec(model, revision=load_kwargs.get("revision"))
    if load_kwargs.get("image_size"):
        spec = spec.replace(image_size=load_kwargs["image_size"])
    decode_kwargs = {"spec": spec, "image_root": image_root, "skip_bad": skip_bad, "max_pixels": max_pixels}
    ds = ds.map_batches(decode_batch, fn_kwargs=decode_kwargs, batch_size=batch_size)  # tasks
    ds = ds.map_batches(
        VembedEmbedder, fn_constructor_kwargs={"model": model, **load_kwargs}, batch_size=batch_size,
        concurrency=actors, num_gpus=gpus_per_actor,
    )  # fmt: skip
    ds = ds.map_batches(_to_arrow, fn_kwargs={"label_type": label_type}, batch_size=None)
    try:
        rows, dim = _write(ds, out, kind)
    except Exception as exc:  # a task's VembedError arrives wrapped in Ray's error types
        cause = _vembed_cause(exc)
        if cause is None:
            raise
        raise cause from None
    return RayEmbedRun(out, rows, time.perf_counter() - start, dim, problems)


def _to_arrow(batch: dict[str, Any], *, label_type: str | None):
    """Rows as an Arrow table with ``embedding`` a fixed-size float32 list (what Milvus, LanceDB, DuckDB read)."""
    import pyarrow as pa

    embeddings = np.ascontiguousarray(batch.pop("embedding"), dtype=np.float32)
    dim = embeddings.shape[1]
    columns = {}
    for key, value in batch.items():
        values = list(value)
        if key == "label" and label_type is not None:
            values = [_label(v, label_type) for v in values]
            columns[key] = pa.array(values, type=pa.int64() if label_type == "int64" else pa.string())
        else:
            columns[key] = pa.array([v.item() if isinstance(v, np.generic) else v for v in values])
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim)
    return pa.table(columns)


def _label(value, label_type: str):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    return int(value) if label_type == "int64" else str(value)


def _write(ds, out: str, kind: str) -> tuple[int, int]:
    if kind == "parquet":
        from vembed.io import atomic_dir

        path = Path(out)
        if path.exists() and not (path.is_dir() and all(p.suffix == ".parquet" for p in path.iterdir())):
            raise VembedError(f"{out} exists and is not a Parquet folder; refusing to replace it")
        with atomic_dir(path) as tmp:
            ds.write_parquet(str(tmp))
        import pyarrow.dataset as pads

        table = pads.dataset(str(path), format="parquet")
        return table.count_rows(), table.schema.field("embedding").type.list_size
    lancedb = require("lancedb", "lancedb", what="--out TABLE.lance")
    text = out.rstrip("/")
    db_uri, _, name = text.rpartition("/")
    db = lancedb.connect(db_uri or ".")
    table, rows, dim = None, 0, 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=4096):
        if table is None:
            table = db.create_table(name.removesuffix(".lance"), schema=batch.schema, mode="overwrite")
        table.add(batch)
        rows += batch.num_rows
        dim = batch.schema.field("embedding").type.list_size
    return rows, dim


def _vembed_cause(exc: BaseException) -> VembedError | None:
    """The VembedError a Ray task raised, from the exception Ray wraps it in (or from its text)."""
    seen, texts = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, VembedError):
            return VembedError(str(exc).strip().splitlines()[-1])
        texts.append(str(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    for text in texts:
        if "VembedError: " in text:
            return VembedError(text.rsplit("VembedError: ", 1)[1].strip().splitlines()[0])
    return None
