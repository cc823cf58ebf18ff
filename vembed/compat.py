"""Accept vembed-factory's flat YAML configs by mapping their keys onto vembed's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vembed.console import log
from vembed.errors import VembedError

# vembed-factory key -> dotted vembed settings key
FACTORY_KEYS: dict[str, str] = {
    "model_name": "model.name",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "learning_rate": "train.lr",
    "lora_r": "train.lora.r",
    "lora_alpha": "train.lora.alpha",
    "lora_dropout": "train.lora.dropout",
    "output_dir": "train.output_dir",
    "seed": "train.seed",
    "weight_decay": "train.weight_decay",
    "max_steps": "train.max_steps",
    "gradient_accumulation_steps": "train.grad_accum",
    "data_path": "data.train",
    "train_data_path": "data.train",
    "val_data_path": "data.val",
    "eval_data_path": "data.val",
    "image_root": "data.image_root",
    "num_workers": "data.num_workers",
}
# keys whose meaning needs a translation, handled in map_factory_config
SPECIAL_KEYS = {"use_lora", "loss_type", "retrieval_mode", "temperature", "mixed_precision", "bf16", "fp16"}
_SECTIONS = {"model", "data", "train", "eval", "export", "index"}


def is_factory_config(data: dict[str, Any]) -> bool:
    """True when a recipe uses vembed-factory's flat keys rather than vembed's sections."""
    return bool(data) and not (set(data) & _SECTIONS) and bool(set(data) & (set(FACTORY_KEYS) | SPECIAL_KEYS))


def map_factory_config(data: dict[str, Any], *, source: str | Path = "config") -> dict[str, Any]:
    """Translate a vembed-factory config into vembed's nested settings dict (with a printed note)."""
    out: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        if key in FACTORY_KEYS:
            _put(out, FACTORY_KEYS[key], value)
        elif key == "use_lora":
            _put(out, "train.method", "lora" if value else "full")
        elif key == "loss_type":
            _put(out, "train.loss", str(value).lower())
        elif key == "temperature":
            _put(out, "train.temperature", value)
        elif key == "mixed_precision":
            _put(out, "train.precision", str(value).lower())
        elif key in ("bf16", "fp16"):
            if value:
                _put(out, "train.precision", key)
        elif key == "retrieval_mode":
            if str(value) not in ("i2i", "image", "image_to_image"):
                raise VembedError(
                    f"{source}: retrieval_mode={value!r} is not supported; vembed trains image-to-image (i2i)"
                )
        else:
            unknown.append(key)
    if unknown:
        raise VembedError(f"{source}: vembed-factory keys vembed does not know: {', '.join(sorted(unknown))}")
    log(
        f"[yellow]note:[/] {source} is a vembed-factory config; mapped to vembed settings "
        f"({', '.join(sorted(data))}). `vembed config show` prints the result."
    )
    return out


def _put(out: dict[str, Any], dotted: str, value: Any) -> None:
    node = out
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
