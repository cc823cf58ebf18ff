"""Accept vembed-factory's flat YAML configs: map their keys onto vembed's settings, with a printed note.

A vembed-factory user switches with one command (``vembed train --config their.yaml``). Every key of
vembed-factory's schema (``ModelArguments``, ``DataArguments``, ``TrainingArguments``) is either
mapped to a vembed setting, ignored because vembed does it its own way (listed in the note), or —
when ignoring it would silently train something else (text-to-image retrieval, a loss vembed does not
have, distillation) — an error naming the file, line and key. Keys outside that schema are errors too.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from vembed.console import log
from vembed.errors import VembedError

SECTIONS = {"model", "data", "train", "eval", "export", "index"}

# vembed-factory key -> dotted vembed settings key (value used as it is; null means "not set")
DIRECT: dict[str, str] = {
    "model_name": "model.name",
    "model_name_or_path": "model.name",
    "projection_dim": "model.projection_dim",
    "data_path": "data.train",
    "train_data_path": "data.train",
    "val_data_path": "data.val",
    "eval_data_path": "data.val",
    "test_data_path": "data.test",
    "num_workers": "data.num_workers",
    "skip_invalid_records": "data.skip_bad",
    "output_dir": "train.output_dir",
    "epochs": "train.epochs",  # an epoch here draws each image once (see docs/training.md)
    "max_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "learning_rate": "train.lr",
    "lr": "train.lr",
    "weight_decay": "train.weight_decay",
    "warmup_ratio": "train.warmup_ratio",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_checkpointing": "train.grad_checkpointing",
    "temperature": "train.temperature",
    "seed": "train.seed",
    "lora_r": "train.lora.r",
    "lora_alpha": "train.lora.alpha",
    "lora_dropout": "train.lora.dropout",
    "lora_target_modules": "train.lora.targets",
}

# keys vembed handles its own way: accepted, reported in the note, not used
IGNORED: dict[str, str] = {
    "model_type": "vembed reads the architecture from the model's config",
    "attn_implementation": "transformers picks SDPA",
    "max_image_size": "vembed uses the model's input size (set model.image_size to change it)",
    "max_seq_length": "text only",
    "topk_tokens": "late-interaction (ColBERT) models only",
    "pin_memory": "vembed's loader decides",
    "prefetch_factor": "vembed's loader decides",
    "persistent_workers": "vembed's loader decides",
    "enable_image_cache": "vembed's loader decides (method=frozen caches features)",
    "validate_data": "records are always validated line by line",
    "overwrite_output_dir": "vembed starts a new run or resumes one (train.resume)",
    "save_strategy": "vembed checkpoints every epoch (and every train.checkpoint_every steps)",
    "report_to": "vembed writes metrics.jsonl (and tensorboard when installed)",
    "run_name": "experiment tracking",
    "run_tags": "experiment tracking",
    "run_notes": "experiment tracking",
    "num_gpus": "launch with `accelerate launch -m vembed train ...`",
    "use_fsdp": "configure FSDP with `accelerate config`",
    "dry_run": "`vembed config show` prints the resolved settings",
    "debug_gpu_memory": "debugging aid",
    "early_stopping_patience": "vembed trains every epoch and keeps the best checkpoint",
    "eval_metric": "vembed selects the model by train.select_metric (default map@r)",
    "eval_metric_better": "vembed selects the model by train.select_metric (default map@r)",
    "distillation_alpha": "distillation is not supported",
    "distillation_temperature": "distillation is not supported",
    "distillation_loss_type": "distillation is not supported",
}

# vembed-factory's defaults that change the optimisation, applied when the config leaves them out, so a
# config trains what it trained there (memory/speed defaults such as fp16 or the gradient cache are not)
FACTORY_DEFAULTS: dict[str, Any] = {"temperature": 0.05, "warmup_ratio": 0.1, "weight_decay": 0.01}

LOSSES = {"infonce": "infonce", "triplet": "triplet", "supcon": "supcon", "arcface": "arcface"}
LOSSES.update({"cosface": "cosface", "ce": "ce", "mrl": "infonce", "clip": "clip", "siglip": "siglip"})
I2I_MODES = {"i2i", "image", "image_to_image"}
IMAGE_TEXT_MODES = {"t2i", "i2t", "text_to_image", "image_to_text"}
IMAGE_TEXT_LOSSES = {None: "clip", "infonce": "clip", "clip": "clip", "siglip": "siglip"}
PRECISIONS = {"no": "no", "fp16": "fp16", "bf16": "bf16", "none": "no", "fp32": "no"}
DTYPES = {"float16", "bfloat16", "float32", "auto"}


def is_factory_config(data: dict[str, Any]) -> bool:
    """True when a recipe uses vembed-factory's flat keys rather than vembed's sections."""
    return bool(data) and not (set(data) & SECTIONS) and bool(set(data) & FACTORY_KEYS)


def map_factory_config(data: dict[str, Any], *, source: str | Path = "config") -> dict[str, Any]:
    """Translate a vembed-factory config into vembed's nested settings dict and print a note."""
    mapped, notes = translate_factory_config(data, source=source)
    log(f"[yellow]note:[/] {source} is a vembed-factory config, mapped to vembed's settings:")
    for line in notes:
        log(f"  {line}")
    log(f"  `vembed config show {source}` prints the resolved settings.")
    return mapped


def translate_factory_config(
    data: dict[str, Any], *, source: str | Path = "config"
) -> tuple[dict[str, Any], list[str]]:
    """``(nested vembed settings, note lines)`` for a vembed-factory config; errors name file:line:key."""
    lines = _key_lines(source)

    def fail(key: str, message: str) -> VembedError:
        where = f"{source}:{lines[key]}" if key in lines else str(source)
        return VembedError(f"{where}: {key}: {message}")

    unknown = [key for key in data if key not in FACTORY_KEYS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), sorted(FACTORY_KEYS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        others = f"; also unknown: {', '.join(map(str, unknown[1:]))}" if unknown[1:] else ""
        raise fail(key, f"not a vembed-factory key vembed knows{hint}{others}")

    out: dict[str, Any] = {}
    mapped: list[str] = []
    ignored: list[str] = []
    origin: dict[str, str] = {}  # dotted vembed key -> factory key that set it

    def put(key: str, dotted: str, value: Any) -> None:
        if dotted in origin and _get(out, dotted) != value:
            raise fail(
                key,
                f"sets {dotted} = {value!r}, but {origin[dotted]} already set it to {_get(out, dotted)!r}",
            )
        origin[dotted] = key
        _put(out, dotted, value)
        mapped.append(f"{key} → {dotted}")

    for key, value in data.items():
        if value is None:
            continue
        if key in DIRECT:
            put(key, DIRECT[key], _translate_value(key, value))
        elif key in IGNORED:
            if key in _IGNORED_ONLY_WHEN_DEFAULT and value not in _IGNORED_ONLY_WHEN_DEFAULT[key]:
                raise fail(key, f"{value!r} is not supported: {IGNORED[key]}")
            ignored.append(key)
        else:
            for dotted, translated in SPECIAL[key](value, lambda msg, key=key: fail(key, msg)):
                put(key, dotted, translated)
    for key, dotted, value in _combined(data, fail):
        put(key, dotted, value)
    if _get(out, "train.task") == "image_text":  # infonce of text-image pairs = the clip loss
        loss = _get(out, "train.loss")
        if loss not in IMAGE_TEXT_LOSSES:
            raise fail(
                "loss_type", f"{loss!r} does not train an image-text dual encoder; use infonce or siglip"
            )
        _put(out, "train.loss", IMAGE_TEXT_LOSSES[loss])
        mapped.append(f"retrieval_mode {data['retrieval_mode']} + loss {loss or 'default'} → train.loss")
    defaults = {k: v for k, v in FACTORY_DEFAULTS.items() if data.get(k) is None}
    if _get(out, "train.loss") not in (None, "infonce", "supcon", "clip", "siglip"):
        defaults.pop("temperature", None)  # only the contrastive losses have one
    for key, value in defaults.items():
        _put(out, DIRECT[key], value)
    notes = ["mapped: " + ", ".join(mapped)] if mapped else []
    if defaults:
        notes.append("vembed-factory defaults kept: " + ", ".join(f"{k}={v}" for k, v in defaults.items()))
    if ignored:
        notes.append("ignored (vembed does these its own way): " + ", ".join(ignored))
    return out, notes


def _key_lines(source: str | Path) -> dict[str, int]:
    """Top-level key → 1-based line in the YAML file (empty when ``source`` is not a readable file)."""
    try:
        node = yaml.compose(Path(source).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def _translate_value(key: str, value: Any) -> Any:
    if key in ("model_name", "model_name_or_path"):
        return str(value)  # a hub id that a registry entry names resolves to it (models.loader)
    return value


Fail = Callable[[str], VembedError]


def _use_lora(value: Any, fail: Fail):
    yield "train.method", "lora" if _bool(value, fail) else "full"


def _loss_type(value: Any, fail: Fail):
    name = str(value).lower()
    if name not in LOSSES:
        raise fail(
            f"{value!r} is not a loss vembed has; use one of {', '.join(sorted(LOSSES))} "
            "(mrl = infonce with Matryoshka widths)"
        )
    yield "train.loss", LOSSES[name]


def _combined(data: dict[str, Any], fail: Callable[[str, str], VembedError]):
    """Settings that come from several factory keys together: Matryoshka widths, gradient cache."""
    matryoshka = data.get("use_mrl") is True or str(data.get("loss_type", "")).lower() == "mrl"
    if matryoshka:
        key = "use_mrl" if data.get("use_mrl") else "loss_type"
        dims = data.get("mrl_dims")
        if not dims:
            raise fail(key, "needs mrl_dims (the truncated widths to train, e.g. [768, 512, 256])")
        weights = data.get("mrl_weights")
        if weights and len(set(weights)) > 1:
            raise fail("mrl_weights", "vembed weights every Matryoshka width equally; remove mrl_weights")
        yield "mrl_dims", "train.matryoshka_dims", dims
    if data.get("use_gradient_cache") is True:
        yield "use_gradient_cache", "train.grad_cache_chunk", data.get("gradient_cache_chunk_size") or 4


def _flag(value: Any, fail: Fail):
    _bool(value, fail)
    return iter(())  # combined with other keys in _combined


def _passed_on(value: Any, fail: Fail):
    return iter(())  # combined with other keys in _combined


def _retrieval_mode(value: Any, fail: Fail):
    mode = str(value).lower()
    if mode in IMAGE_TEXT_MODES:  # text->image / image->text: a CLIP / SigLIP dual encoder
        yield "train.task", "image_text"
    elif mode not in I2I_MODES:
        raise fail(
            f"{value!r} is not supported: vembed trains image-to-image embeddings (retrieval_mode: i2i) and "
            "image-text dual encoders (t2i, i2t); text-to-text and multimodal (m2i) queries need a text or "
            "multimodal encoder vembed does not train"
        )


def _encoder_mode(value: Any, fail: Fail):
    if str(value).lower() not in ("auto", "vision", "clip_like"):
        raise fail(f"{value!r} is not supported: vembed embeds images with one vision backbone")
    return iter(())


def _image_model_name(value: Any, fail: Fail):
    yield "model.name", str(value)


def _not_supported(what: str):
    def handler(value: Any, fail: Fail):
        raise fail(f"{what} is not supported by vembed; remove the key")

    return handler


def _image_root(value: Any, fail: Fail):
    if value != "":
        yield "data.image_root", value


def _column_mapping(value: Any, fail: Fail):
    if value:
        raise fail(
            "vembed's records use fixed fields (image/label, or query_image/positive); "
            "rename the columns, or convert with `vembed prepare jsonl`"
        )
    return iter(())


def _pooling_method(value: Any, fail: Fail):
    name = str(value).lower()
    if name in ("none", "default", ""):
        return
    if name not in ("cls", "mean", "gem", "pooler", "cls+mean"):
        raise fail(f"{value!r} is not a pooling vembed has (cls, mean, gem, pooler, cls+mean)")
    yield "model.pooling", name


def _torch_dtype(value: Any, fail: Fail):
    if str(value) not in DTYPES:
        raise fail(f"{value!r} is not one of {', '.join(sorted(DTYPES))}")
    yield "model.dtype", str(value)


def _max_grad_norm(value: Any, fail: Fail):
    yield "train.grad_clip", value if value and value > 0 else None


def _warmup_steps(value: Any, fail: Fail):
    if value:
        raise fail("vembed sets the warm-up as a share of the steps: use warmup_ratio instead")
    return iter(())


def _scheduler_type(value: Any, fail: Fail):
    name = str(value).lower()
    if name not in ("cosine", "cosine_with_warmup", "constant", "constant_with_warmup"):
        raise fail(f"{value!r} is not supported: train.scheduler is cosine, step or constant")
    yield "train.scheduler", "constant" if name.startswith("constant") else "cosine"


def _fp16(value: Any, fail: Fail):
    if _bool(value, fail):
        yield "train.precision", "fp16"


def _bf16(value: Any, fail: Fail):
    if _bool(value, fail):
        yield "train.precision", "bf16"


def _mixed_precision(value: Any, fail: Fail):
    name = str(value).lower()
    if name not in PRECISIONS:
        raise fail(f"{value!r} is not one of no, fp16, bf16")
    yield "train.precision", PRECISIONS[name]


def _save_steps(value: Any, fail: Fail):
    if value:
        yield "train.checkpoint_every", value


def _logging_steps(value: Any, fail: Fail):
    if value:
        yield "train.log_every", value


def _eval_steps(value: Any, fail: Fail):
    if value:
        yield "train.eval_every", value


def _bool(value: Any, fail: Fail) -> bool:
    if not isinstance(value, bool):
        raise fail(f"expected true or false, got {value!r}")
    return value


SPECIAL: dict[str, Callable] = {
    "use_lora": _use_lora,
    "loss_type": _loss_type,
    "use_mrl": _flag,
    "mrl_dims": _passed_on,
    "mrl_weights": _passed_on,
    "retrieval_mode": _retrieval_mode,
    "encoder_mode": _encoder_mode,
    "image_model_name": _image_model_name,
    "text_model_name": _not_supported("a text encoder (composed text+image models)"),
    "teacher_model_name": _not_supported("knowledge distillation (teacher_model_name)"),
    "column_mapping": _column_mapping,
    "image_root": _image_root,
    "pooling_method": _pooling_method,
    "torch_dtype": _torch_dtype,
    "max_grad_norm": _max_grad_norm,
    "warmup_steps": _warmup_steps,
    "scheduler_type": _scheduler_type,
    "fp16": _fp16,
    "bf16": _bf16,
    "mixed_precision": _mixed_precision,
    "use_gradient_cache": _flag,
    "gradient_cache_chunk_size": _passed_on,
    "save_steps": _save_steps,
    "logging_steps": _logging_steps,
    "eval_steps": _eval_steps,
}

# ignored keys whose non-default values would change what is trained: errors instead
_IGNORED_ONLY_WHEN_DEFAULT: dict[str, tuple] = {
    "early_stopping_patience": (-1, 0),
}

FACTORY_KEYS = set(DIRECT) | set(IGNORED) | set(SPECIAL)


def _get(out: dict[str, Any], dotted: str) -> Any:
    node: Any = out
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _put(out: dict[str, Any], dotted: str, value: Any) -> None:
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
