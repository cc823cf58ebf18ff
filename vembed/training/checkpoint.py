"""Training checkpoints: safetensors + JSON only (no pickle), written atomically, with retention.

A checkpoint is a folder ``checkpoints/step-0000120/``:

- ``model.safetensors``  the trainable weights (LoRA adapters, or all of a fully fine-tuned backbone,
  projection) and the loss's parameters (``loss.*``); frozen weights come back from the base model;
- ``optimizer.safetensors`` + ``optimizer.json``  AdamW's moments and its parameter groups;
- ``rng-<rank>.safetensors``  every random generator of each process (python, numpy, torch, cuda);
- ``state.json``  step, epoch, scheduler and grad-scaler state, validation history, the settings.

It is written to ``.step-0000120.tmp`` and renamed when complete, so a kill during saving leaves the
previous checkpoint as it was; older checkpoints beyond ``keep`` are deleted only after the rename.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.optim import Optimizer

from vembed.errors import VembedError
from vembed.io import make_readable
from vembed.models.weights import check_safetensors, load_safetensors

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial(run_dir: Path) -> None:
    """Delete half-written checkpoint folders left by a kill during saving."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(".step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


# -- writing ----------------------------------------------------------------------------------------


def begin(run_dir: Path, step: int) -> Path:
    """The temporary folder a checkpoint is written into (same name on every process)."""
    tmp = Path(run_dir) / CHECKPOINTS / f".step-{step:07d}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def write_main(
    tmp: Path,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer: Optimizer,
    state: dict[str, Any],
) -> None:
    """The files only the main process writes: weights, optimiser, trainer state."""
    model_state = _contiguous(model_state)
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    with disk_full_is_an_error(tmp, needed=_nbytes(model_state) + _nbytes(tensors)):
        save_file(model_state, str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=_json_default))


def write_rng(tmp: Path, rank: int) -> None:
    """This process' random generator states."""
    tensors, meta = capture_rng()
    with disk_full_is_an_error(tmp, needed=_nbytes(tensors)):
        save_file(tensors, str(tmp / f"rng-{rank}.safetensors"), metadata=meta)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_full_is_an_error(tmp: Path, *, needed: int):
    """A full disk (or quota) while writing checkpoint ``tmp`` → a :class:`VembedError` saying what
    happened, what was kept and how much space it needs; the partial checkpoint is removed."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        full = getattr(exc, "errno", None) in _DISK_FULL or any(
            text in str(exc) for text in ("No space left", "os error 28", "Disk quota", "os error 122")
        )
        if not full:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        run_dir = tmp.parent.parent
        kept = list_checkpoints(run_dir)
        earlier = (
            f"the earlier checkpoints are intact (latest: {kept[-1].name}) and `--resume` continues from it"
            if kept
            else "no earlier checkpoint was saved (rerun the command once there is space)"
        )
        step = tmp.name.removeprefix(".").removesuffix(".tmp")
        free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else 0
        raise VembedError(
            f"{run_dir}: no space left on the disk while writing checkpoint {step}, which was not saved; "
            f"{earlier}; a checkpoint needs about {_size(needed)} ({_size(free)} free there): free some "
            "space (or lower train.keep_checkpoints) and resume"
        ) from None


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _size(nbytes: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def commit(tmp: Path, final: Path, *, keep: int) -> None:
    """Make the checkpoint visible (fsync, rename), then delete the oldest beyond ``keep``."""
    make_readable(tmp)  # safetensors writes 0600
    for p in tmp.iterdir():
        with open(p, "rb+") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # the same step saved again (resumed at a finished run)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# -- reading ----------------------------------------------------------------------------------------


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VembedError(f"{path}: unreadable checkpoint ({exc})") from None


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path / "model.safetensors")


def load_optimizer(path: Path, optimizer: Optimizer) -> None:
    meta = json.loads((path / "optimizer.json").read_text())
    tensors = load_safetensors(path / "optimizer.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta))


def load_rng(path: Path, rank: int) -> None:
    file = path / f"rng-{rank}.safetensors"
    if not file.is_file():
        raise VembedError(
            f"{path}: no random state for process {rank}; resume with the number of processes that saved it"
        )
    check_safetensors(file)
    with safe_open(str(file), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    restore_rng(tensors, meta)


# -- random generators ------------------------------------------------------------------------------


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """python, numpy, torch (and CUDA) generator states as tensors + string metadata."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
        "python": torch.tensor(internal, dtype=torch.int64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    meta = {
        "python": json.dumps([version, gauss]),
        "numpy": json.dumps([name, int(pos), int(has_gauss), float(cached)]),
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    version, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(int(x) for x in tensors["python"].tolist()), gauss))
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors, key=_cuda_index) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _cuda_index(key: str) -> int:
    return int(key.split("_")[1]) if key.startswith("cuda_") else -1


# -- optimiser state as safetensors -----------------------------------------------------------------


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    groups = meta["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
