"""Settings: one pydantic section per concern, loaded from a YAML recipe plus ``key=value`` overrides.

Every subcommand reads the same :class:`Settings`. Unknown keys are errors that name the key and
suggest the closest valid one; wrong types name the key, the value and what was expected.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
)

from vembed.errors import VembedError
from vembed.recipe_files import parse_override, read_recipe, set_dotted
from vembed.settings.augment import AugmentSettings
from vembed.settings.base import Section, split_ints
from vembed.settings.train import LoraSettings, TrainSettings

__all__ = [
    "AugmentSettings",
    "LoraSettings",
    "Section",
    "Settings",
    "TrainSettings",
    "load_settings",
    "settings_to_yaml",
    "validate_settings",
]

Pooling = Literal["cls", "mean", "cls+mean", "gem", "pooler"]


def default_num_workers() -> int:
    """Usable CPU cores minus one for the training/inference process, between 1 and 12.

    One worker decodes and augments ~100-200 SOP-sized JPEGs per second (``python -m bench --only
    loader``), so a GPU step rate of ~2,500 images/s needs most of a 16-core machine.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores - 1, 12))


class ModelSettings(Section):
    name: str = Field("dinov2-small", description="Registry name, hub id, or local model directory.")
    pooling: Pooling | None = Field(None, description="Token pooling; default: the model spec's.")
    projection_dim: int | None = Field(None, ge=1, description="Add a linear projection to this width.")
    normalize: bool | None = Field(
        None,
        description="L2-normalise embeddings; default: what a saved model says (its vembed.json), else true.",
    )
    truncate_dim: int | None = Field(
        None,
        ge=1,
        description="Keep the first N dims of each embedding, re-normalised (a Matryoshka width; "
        "see train.matryoshka_dims).",
    )
    image_size: int | None = Field(
        None,
        ge=14,
        description="Override the spec's input size (segmentation: rounded to a multiple of the patch).",
    )
    decoder: Literal["linear", "fpn"] = Field(
        "linear",
        description="train.task=segmentation: linear (1x1 conv on the last layer's patch features) or fpn "
        "(features of four layers).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Inference dtype. auto: bf16 on GPUs (fp16 without bf16) and on CPUs with native bf16 "
        "(AMX / AVX512-BF16, ARM BF16), fp32 otherwise; training keeps fp32 weights (see train.precision).",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps ...")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto",
        description="Attention kernels (transformers' attn_implementation). auto: transformers' choice "
        "(sdpa, which on a GPU picks flash / memory-efficient kernels itself); flash_attention_2 needs "
        "the flash-attn package.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")


class DataSettings(Section):
    train: Path | None = Field(None, description="Training records (JSONL).")
    val: Path | None = Field(None, description="Validation records (JSONL), never the test split.")
    test: Path | None = Field(None, description="Test records (JSONL).")
    image_root: Path | None = Field(
        None, description="Resolve relative image paths here (default: the JSONL's folder)."
    )
    num_workers: int = Field(
        default_factory=lambda: default_num_workers(),
        ge=0,
        description="DataLoader worker processes decoding images; default: the usable CPU cores minus one "
        "(1 to 12).",
    )
    skip_bad: bool = Field(False, description="Skip (and count) bad records and images instead of failing.")
    max_image_pixels: int = Field(
        100_000_000,
        ge=0,
        description="Largest image decoded (width × height); larger JPEGs decode at a reduced scale, other "
        "formats are refused (skipped with skip_bad). 0: no limit.",
    )


class EvalSettings(Section):
    k: list[int] = Field(default_factory=lambda: [1, 10, 100], description="Recall@K cut-offs.")
    batch_size: int = Field(64, ge=1, description="Images per forward pass.")
    chunk_size: int = Field(4096, ge=1, description="Query rows per similarity block.")
    shots: list[PositiveInt] = Field(
        default_factory=lambda: [1, 3, 10], description="`eval fewshot`: support images per class (k)."
    )
    episodes: int = Field(
        1, ge=1, description="`eval fewshot`: 1 = the first k per class; N > 1 = N seeded random draws."
    )
    knn_k: int = Field(20, ge=1, description="`eval knn`: neighbours that vote.")
    cache_dir: Path | None = Field(
        None,
        description="`eval linear-probe` embedding cache (default $VEMBED_CACHE_DIR or "
        "~/.cache/vembed/embeddings).",
    )

    _split_k = field_validator("k", "shots", mode="before")(split_ints)


class ExportSettings(Section):
    """``vembed export RUN``'s defaults, read from the run's settings (``--dtype`` / ``--onnx`` win)."""

    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Weights of the exported backbone (ONNX graphs are always float32)."
    )
    onnx: bool = Field(False, description="Also write model.onnx, checked against PyTorch (onnxruntime).")


class IndexSettings(Section):
    kind: Literal["auto", "exact", "flat", "hnsw", "ivf", "ivfpq"] = Field(
        "auto", description="auto: exact below index.faiss_threshold vectors, faiss HNSW above."
    )
    shard_size: int = Field(10_000, ge=1, description="Images per store shard (`vembed embed --out`).")
    faiss_threshold: int = Field(200_000, ge=0)
    batch_size: int = Field(64, ge=1, description="Images per forward pass when embedding.")
    k: int = Field(10, ge=1, description="Results per query for `vembed search`.")
    chunk_size: int = Field(4096, ge=1, description="Query rows per similarity block (exact search).")
    hnsw_m: int = Field(32, ge=4, description="HNSW: neighbours per node (more: better recall, more RAM).")
    ef_construction: int = Field(200, ge=8, description="HNSW: candidate list size while building.")
    ef_search: int = Field(128, ge=1, description="HNSW: candidate list size while searching (>= k).")
    nlist: int | None = Field(None, ge=1, description="IVF: number of clusters; default ~4·sqrt(N).")
    nprobe: int = Field(16, ge=1, description="IVF: clusters visited per query.")
    pq_m: int | None = Field(
        None, ge=1, description="IVF-PQ: sub-quantizers per vector (must divide dim); default dim/4 bytes."
    )
    pq_nbits: int = Field(8, ge=1, le=16, description="IVF-PQ: bits per sub-quantizer code.")
    opq: bool = Field(False, description="IVF-PQ: learn a rotation (OPQ) before quantizing.")
    rerank: int = Field(
        16,
        ge=0,
        description="IVF-PQ: re-score k·rerank candidates (at least 256) exactly from the store's vectors (0: off).",
    )
    train_size: int | None = Field(
        None, ge=1, description="IVF/IVF-PQ: vectors sampled to train the clusters; default 64 per cluster."
    )
    mmap: bool = Field(
        False, description="Map IVF/IVF-PQ indexes from disk instead of reading them into RAM."
    )


class Settings(Section):
    """All of vembed's settings; a recipe YAML has one mapping per section."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)


def load_settings(
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> Settings:
    """Read a YAML recipe (optional), apply dotted ``key=value`` overrides, then ``values``, validate.

    ``overrides`` are strings parsed as YAML scalars (as typed on a command line); ``values`` maps
    dotted keys to Python values used as they are (command-line flags, library callers).

    >>> load_settings(None, ["train.lr=3e-4", "model.name=dinov2-base"]).train.lr
    0.0003
    """
    data: dict[str, Any] = {}
    source = "settings"
    if recipe is not None:
        source = str(recipe)
        data = read_recipe(Path(recipe))
    recipe_steps = data.get("train", {}).get("max_steps") if isinstance(data.get("train"), dict) else None
    given = set()
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
        given.add(key)
    for key, value in (values or {}).items():
        set_dotted(data, key, value)
        given.add(key)
    if recipe_steps is not None and "train.epochs" in given and "train.max_steps" not in given:
        _epochs_win(data, recipe_steps, source)
    return validate_settings(data, source=source)


def _epochs_win(data: dict[str, Any], recipe_steps: Any, source: str) -> None:
    """``train.epochs`` given on the command line over a recipe that sets ``train.max_steps`` (which
    would overrule it): the epochs asked for win, and the line says so."""
    from vembed.console import log

    set_dotted(data, "train.max_steps", None)
    epochs = data["train"].get("epochs")
    log(
        f"[yellow]note:[/] train.epochs={epochs} given on the command line: {source}'s "
        f"train.max_steps={recipe_steps} is dropped (give train.max_steps too to keep a step limit)"
    )


def validate_settings(data: dict[str, Any], *, source: str = "settings") -> Settings:
    """Validate a nested dict; raise one :class:`VembedError` naming each bad key."""
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise VembedError(f"{source}: " + "; ".join(_describe(err) for err in exc.errors())) from None


def settings_to_yaml(settings: Settings) -> str:
    """The fully resolved settings as YAML (written next to every output)."""
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Settings
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(repr(str(p))[1:-1] for p in loc)  # a key typed with a newline stays on one line
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = list(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)" if close else ""
        return f"unknown setting '{key}'{hint}; valid keys here: {', '.join(valid)}"
    value = err.get("input")
    return f"'{key}' = {value!r}: {err['msg']}"
