"""One model identity: which model a reference names, and what a saved model folder says about itself.

A model reference is resolved by one rule, in this order:

1. an existing local folder — a model folder (``config.json``), or a run directory whose ``final/`` is one;
2. a registry name (``vembed models``);
3. a hub id (``org/name``), whose files are read exactly like a local folder's.

A reference that looks like a path but names nothing (``runs/x/final`` not on disk, not a hub id) is
"no such model folder", never a connection failure. ``vembed.json`` — the identity ``save_embedder``
and ``vembed export`` write beside the backbone — is read here and only here (:func:`read_model_config`)
and written here (:func:`write_model_config`); training, evaluation, the store and export all load
models through :func:`load_model`.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from vembed.errors import VembedError
from vembed.io import parse_json, read_json, read_text, write_json
from vembed.models.registry import REGISTRY, ModelSpec, registry_name, spec_from_config
from vembed.models.weights import check_model_folder, refusal

VEMBED_CONFIG = "vembed.json"
HEAD_WEIGHTS = "vembed_head.safetensors"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
TASK_HEAD_PREFIX = "task_head."  # weights of a task head (classifier, segmenter) in HEAD_WEIGHTS
RUN_MARKERS = ("settings.yaml", "metrics.jsonl", "checkpoints")
# vembed.json keys that ModelConfig holds as fields; every other key is kept in ModelConfig.extra
_FIELDS = (
    "vembed_version",
    "base_model",
    "family",
    "pooling",
    "projection_dim",
    "normalize",
    "embed_dim",
    "truncate_dim",
    "num_prefix_tokens",
    "lora_targets",
    "preprocessing",
    "task_head",
)


# the type each vembed.json key must have when present (names in messages)
_FIELD_TYPES = {
    **dict.fromkeys(("vembed_version", "base_model", "family", "pooling"), "string"),
    **dict.fromkeys(("projection_dim", "embed_dim", "truncate_dim"), "positive integer"),
    "num_prefix_tokens": "integer >= 0",
    "normalize": "boolean",
    "lora_targets": "list of strings",
}
_PREPROCESSING_TYPES = {
    "image_size": "positive integer",
    "crop_pct": "positive number",
    "mean": "list of 3 numbers",
    "std": "list of 3 numbers",
    **dict.fromkeys(("interpolation", "resize"), "string"),
}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference: ``kind`` is ``folder``, ``registry`` or ``hub``."""

    text: str  # what the user wrote
    kind: str
    name: str  # the folder path, registry name or hub id
    run_dir: Path | None = None  # set when a run directory was given (its final/ is the model)

    @property
    def folder(self) -> Path | None:
        return Path(self.name) if self.kind == "folder" else None


@dataclass
class ModelConfig:
    """The parsed ``vembed.json`` of a saved model; every field is optional (older or hand-made files).

    ``task_head`` leaves room for a task's head (e.g. ``{"kind": "classifier", "labels": [...]}``):
    its weights live in ``vembed_head.safetensors`` under the ``task_head.`` prefix.
    """

    vembed_version: str | None = None
    base_model: str | None = None
    family: str | None = None
    pooling: str | None = None
    projection_dim: int | None = None
    normalize: bool | None = None
    embed_dim: int | None = None
    truncate_dim: int | None = None  # the first N dims of the embedding, re-normalised (Matryoshka)
    num_prefix_tokens: int | None = None
    lora_targets: list[str] | None = None
    preprocessing: dict = field(default_factory=dict)
    task_head: dict | None = None
    extra: dict = field(default_factory=dict)  # everything else (training, export, exported_from ...)

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> ModelConfig:
        if not isinstance(data, dict):
            raise VembedError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {key: data[key] for key in _FIELDS if data.get(key) is not None}
        if not isinstance(known.get("preprocessing", {}), dict):
            raise VembedError(f"{where}: 'preprocessing' must be an object")
        if not isinstance(known.get("task_head", {}), dict):
            raise VembedError(f"{where}: 'task_head' must be an object")
        _check_types(known, _FIELD_TYPES, where)
        _check_types(known.get("preprocessing", {}), _PREPROCESSING_TYPES, where, "preprocessing.")
        extra = {key: value for key, value in data.items() if key not in _FIELDS}
        return cls(**known, extra=extra)

    def to_json(self) -> dict:
        out = {key: getattr(self, key) for key in _FIELDS}
        if out["task_head"] is None:
            del out["task_head"]
        return {**out, **self.extra}


def read_model_config(folder: str | Path) -> ModelConfig | None:
    """The one reader of ``vembed.json``: ``None`` when the folder has none."""
    path = Path(folder) / VEMBED_CONFIG
    data = read_json(path)
    return None if data is None else ModelConfig.from_json(data, where=str(path))


def write_model_config(folder: str | Path, config: ModelConfig) -> Path:
    """The one writer of ``vembed.json`` (atomic); writes back exactly what :func:`read_model_config` read."""
    return write_json(Path(folder) / VEMBED_CONFIG, config.to_json())


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` that the hub accepts as a repository id."""
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_ref(model: str | Path) -> ModelRef:
    """Apply the precedence rule (local folder > registry name > hub id) without loading anything."""
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelRef(text, "folder", str(path))
        if (path / "final" / "config.json").is_file():
            return ModelRef(text, "folder", str(path / "final"), run_dir=path)
        if any((path / marker).exists() for marker in RUN_MARKERS):
            raise VembedError(
                f"{path}: run directory has no final/ model (the run did not finish); resume it with "
                f"`vembed train --config {path / 'settings.yaml'} --resume`"
            )
        raise VembedError(f"{path}: not a model folder (no config.json) nor a run directory (with final/)")
    if path.exists():
        raise VembedError(f"{path}: is a file, not a model folder")
    if text in REGISTRY:
        return ModelRef(text, "registry", text)
    if registry_name(text) is not None:  # facebook/dinov2-base → dinov2-base (its eval preprocessing)
        return ModelRef(text, "registry", registry_name(text))
    if looks_like_hub_id(text):
        return ModelRef(text, "hub", text)
    if "/" in text or "\\" in text or text.startswith((".", "~")):
        raise VembedError(
            f"{text}: no such model folder or run directory (nor a registry name or a hub id org/name)"
        )
    close = difflib.get_close_matches(text, list(REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise VembedError(
        f"unknown model {text!r}: not a registry name, an existing folder or a hub id (org/name).{hint} "
        "`vembed models` lists the registry."
    )


def hub_file(
    hub_id: str, filename: str, *, revision: str | None = None, required: bool = False
) -> Path | None:
    """A file of a hub repository (downloaded or cached); ``None`` when an optional file is absent.

    The one place the loader talks to the hub; tests replace it. When the hub cannot be reached (one
    quick connection attempt, :func:`hub_reachable`) the process switches to the local cache at once
    (as ``HF_HUB_OFFLINE=1`` does) instead of a minute of retries, and a model that is not cached is an
    error saying so.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        constants.HF_HUB_OFFLINE = True  # transformers' from_pretrained reads it too: no retries there
        from vembed.console import log

        log(
            f"[yellow]note:[/] the Hugging Face Hub ({constants.ENDPOINT}) is unreachable: using the local cache"
        )
    try:
        return Path(hf_hub_download(hub_id, filename, revision=revision))
    except LocalEntryNotFoundError as exc:  # offline, and not in the cache
        if not required:
            return None
        if constants.HF_HUB_OFFLINE:
            raise VembedError(
                f"cannot load {hub_id!r}: the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE=1 is set) "
                f"and its {filename} is not in the local cache; connect once to download it, or give a "
                "local model folder"
            ) from None
        error: Exception = exc
    except EntryNotFoundError as exc:  # not in the repository
        if not required:
            return None
        error = exc
    except (HFValidationError, OSError, ValueError) as exc:  # network, auth, missing repo or revision
        error = exc
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise VembedError(
        f"cannot load {filename} of {hub_id!r} from the Hugging Face Hub ({reason}); "
        f"{hub_id!r} is neither a local folder nor a registry name"
    )


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a connection to the hub's host (``HF_ENDPOINT``) opens within ``timeout`` seconds;
    asked once per process."""
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


@dataclass
class LoadedModel:
    """What a reference resolves to: the spec, the saved identity and head weights, the backbone."""

    ref: ModelRef
    spec: ModelSpec
    config: ModelConfig | None  # vembed.json, when the model was saved by vembed
    head_state: dict = field(default_factory=dict)  # projection / GeM weights (Embedder keys)
    task_head_state: dict = field(default_factory=dict)  # task head weights, prefix removed
    backbone: Any = None  # the transformers vision tower (load_model(..., weights=True))

    @property
    def task_head(self) -> dict | None:
        """The saved task head's config (``vembed.json: task_head``), ``None`` for an embedding model."""
        return self.config.task_head if self.config is not None else None


def load_model(
    model: str | Path, *, revision: str | None = None, weights: bool = True, attention: str = "auto"
) -> LoadedModel:
    """Resolve ``model`` and load its spec, saved identity, head weights and (``weights``) backbone.

    ``attention``: transformers' ``attn_implementation`` for the backbone (``model.attention``).
    """
    ref = resolve_ref(model)
    if ref.kind == "registry":
        spec = REGISTRY[ref.name]
        loaded = LoadedModel(ref, spec.replace(base_model=spec.base_model or spec.source), None)
    else:
        loaded = _load_files(ref, revision=revision)
    if weights:
        loaded.backbone = load_backbone(loaded.spec, revision=revision, attention=attention)
    return loaded


def load_backbone(
    spec: ModelSpec, *, revision: str | None = None, attention: str = "auto"
) -> torch.nn.Module:
    """Load the vision tower named by ``spec`` through ``from_pretrained`` (hub id or folder).

    ``attention`` is transformers' ``attn_implementation`` (``auto``: transformers' default).
    """
    cls = getattr(transformers, spec.family_info.model_class)
    transformers.utils.logging.disable_progress_bar()
    if Path(spec.source).is_dir():
        check_model_folder(spec.source)
    options = {} if attention == "auto" else {"attn_implementation": attention}
    try:
        return cls.from_pretrained(
            spec.source, revision=revision, **dict(spec.family_info.load_options), **options
        )
    except (ImportError, ValueError) as exc:
        if not options:
            raise
        raise VembedError(f"model.attention={attention}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise VembedError(f"cannot load model weights from {spec.source!r}: {exc}") from None
    except Exception as exc:  # a pickle refused by weights_only, a broken safetensors file
        error = refusal(spec.source, exc)
        if error is None:
            raise
        raise error from None


def load_spec(model: str | Path, *, revision: str | None = None) -> ModelSpec:
    """Just the spec of ``model`` (no weights, no head files beyond what identifies it)."""
    return load_model(model, revision=revision, weights=False).spec


def _load_files(ref: ModelRef, *, revision: str | None) -> LoadedModel:
    """A folder's or hub repository's config, preprocessing, vembed.json and head weights."""
    if ref.kind == "folder":
        folder = Path(ref.name)

        def find(name: str) -> Path | None:
            return folder / name if (folder / name).is_file() else None
    else:

        def find(name: str) -> Path | None:
            return hub_file(ref.name, name, revision=revision, required=name == "config.json")

    config_file = find("config.json")
    if config_file is None:
        raise VembedError(f"{ref.name}: not a model directory (no config.json)")
    config = check_config(_json(config_file), where=str(config_file))
    preprocessor_file = find(PREPROCESSOR_CONFIG)
    preprocessor = (
        check_preprocessor(_json(preprocessor_file), where=str(preprocessor_file))
        if preprocessor_file
        else None
    )
    spec = spec_from_config(config, name=ref.name, source=ref.name, preprocessor=preprocessor)
    spec = spec.replace(base_model=ref.name)
    saved_file = find(VEMBED_CONFIG)
    saved = ModelConfig.from_json(_json(saved_file), where=str(saved_file)) if saved_file else None
    head_state, task_state = {}, {}
    if saved is not None:
        spec = apply_model_config(spec, saved)
        head_file = find(HEAD_WEIGHTS)
        if head_file is not None:
            from vembed.models.weights import load_safetensors

            state = load_safetensors(head_file)
            head_state = {k: v for k, v in state.items() if not k.startswith(TASK_HEAD_PREFIX)}
            task_state = {
                k[len(TASK_HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(TASK_HEAD_PREFIX)
            }
    return LoadedModel(ref, spec, saved, head_state, task_state)


def apply_model_config(spec: ModelSpec, saved: ModelConfig) -> ModelSpec:
    """The spec as a saved ``vembed.json`` records it (its pooling and preprocessing win)."""
    pre = saved.preprocessing
    return spec.replace(
        pooling=saved.pooling or spec.pooling,
        image_size=pre.get("image_size", spec.image_size),
        crop_pct=pre.get("crop_pct", spec.crop_pct),
        mean=tuple(pre.get("mean", spec.mean)),
        std=tuple(pre.get("std", spec.std)),
        interpolation=pre.get("interpolation", spec.interpolation),
        resize=pre.get("resize", spec.resize),
        lora_targets=tuple(saved.lora_targets or spec.lora_targets),
        base_model=saved.base_model or spec.base_model,
        description=f"saved by vembed from {saved.base_model or '?'}",
    )


def _json(path: Path) -> Any:
    return parse_json(read_text(path), path)


# -- what a config.json / preprocessor_config.json must hold for vembed to read it ------------------

_CONFIG_SIZES = ("hidden_size", "image_size", "patch_size")  # positive integers when present


def check_config(config: Any, *, where: str) -> dict:
    """``config.json`` as vembed reads it: an object whose sizes (also under ``vision_config``) are
    positive integers; anything else is a :class:`VembedError` naming the file and key."""
    _expect_object(config, where, "the file")
    if config.get("model_type") is not None and not isinstance(config["model_type"], str):
        raise VembedError(f"{where}: 'model_type' must be a string, got {config['model_type']!r}")
    sections = [(config, "")]
    if "vision_config" in config:
        _expect_object(config["vision_config"], where, "'vision_config'")
        sections.append((config["vision_config"], "vision_config."))
    for section, prefix in sections:
        for key in _CONFIG_SIZES:
            if key in section:
                _positive_int(section[key], where, prefix + key)
        if section.get("num_register_tokens") is not None:
            _positive_int(section["num_register_tokens"], where, prefix + "num_register_tokens", minimum=0)
    return config


def check_preprocessor(processor: Any, *, where: str) -> dict:
    """``preprocessor_config.json`` as vembed reads it (sizes positive integers, mean/std 3 numbers);
    returned with a single-number ``image_mean``/``image_std`` widened to three channels."""
    _expect_object(processor, where, "the file")
    processor = dict(processor)
    for key, names in (("size", ("shortest_edge", "height", "width")), ("crop_size", ("height", "width"))):
        value = processor.get(key)
        if isinstance(value, dict):
            for name in names:  # size.shortest_edge / size.height are read when present, even as null
                if value.get(name) is not None or (key == "size" and name in value and name != "width"):
                    _positive_int(value[name], where, f"{key}.{name}")
        elif value is not None:
            _positive_int(value, where, key)
    for key in ("image_mean", "image_std"):
        value = processor.get(key)
        if _is_number(value):
            value = processor[key] = [value] * 3
        if value is not None and not (
            isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)
        ):
            raise VembedError(
                f"{where}: '{key}' must be a list of 3 numbers (one per channel), got {value!r}"
            )
        if key == "image_std" and value is not None and not all(v > 0 for v in value):
            raise VembedError(f"{where}: 'image_std' must be positive, got {value!r}")
    if processor.get("resample") is not None and not _is_int(processor["resample"]):
        raise VembedError(
            f"{where}: 'resample' must be an integer (a PIL filter), got {processor['resample']!r}"
        )
    return processor


def _check_types(data: dict, types: dict[str, str], where: str, prefix: str = "") -> None:
    """Each key of ``types`` present (and not null) in ``data`` has that type, else a VembedError."""
    checks = {
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "positive integer": lambda v: _is_int(v) and v > 0,
        "integer >= 0": lambda v: _is_int(v) and v >= 0,
        "positive number": lambda v: _is_number(v) and v > 0,
        "list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "list of 3 numbers": lambda v: isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v),
    }
    for key, kind in types.items():
        if data.get(key) is not None and not checks[kind](data[key]):
            raise VembedError(f"{where}: '{prefix}{key}' must be a {kind}, got {json.dumps(data[key])[:60]}")


def _expect_object(value: Any, where: str, what: str) -> None:
    if not isinstance(value, dict):
        raise VembedError(f"{where}: {what} must be a JSON object, got {_type_name(value)}")


def _positive_int(value: Any, where: str, key: str, *, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise VembedError(f"{where}: '{key}' must be {wanted}, got {json.dumps(value)[:60]}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _type_name(value: Any) -> str:
    names = {list: "a list", str: "a string", dict: "an object", type(None): "null", bool: "true/false"}
    return names.get(type(value), f"the number {value}")
