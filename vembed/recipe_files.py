"""Recipe files and ``key=value`` overrides, read into the plain nested dict that settings validate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vembed.errors import VembedError
from vembed.io import read_text


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` → ``("train.lr", "3e-4")``; values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise VembedError(f"override {item!r} is not key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise VembedError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def read_recipe(path: Path) -> dict[str, Any]:
    """A YAML recipe as a plain dict (a vembed-factory flat config is mapped); errors name the file/line."""
    if path.is_dir():
        raise VembedError(f"{path}: is a folder; --config takes a YAML recipe file")
    if not path.is_file():
        raise VembedError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(read_text(path)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or exc
        raise VembedError(f"{path}{where}: invalid YAML ({' '.join(str(problem).split())})") from None
    if not isinstance(data, dict):
        raise VembedError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    from vembed.compat import is_factory_config, map_factory_config

    if is_factory_config(data):
        data = map_factory_config(data, source=path)
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "train.lr", 1e-4)`` sets ``d["train"]["lr"]``, creating sections as needed.

    A section given as a boolean (``train.augment: false``, the old on/off switch) means
    ``{enabled: false}``: a dotted key under it keeps that meaning (``train.augment=false
    train.augment.hflip=0`` stays off), and a boolean set on a section given as a mapping sets its
    ``enabled`` and keeps its other keys, so the order of the two does not matter.
    """
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, bool):
            child = {"enabled": child}
            node[part] = child
        elif not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    current = node.get(parts[-1])
    if isinstance(value, bool) and isinstance(current, dict):
        current["enabled"] = value
    else:
        node[parts[-1]] = value
