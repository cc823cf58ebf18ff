"""Reading weight files safely: every failure names the file, and pickled code is never run.

- ``*.safetensors``: the header is checked against the file's size before anything is read, so a
  truncated file (a copy or a download cut short) is one line naming it, not a Rust error.
- ``pytorch_model.bin`` and other pickles: only what ``torch.load(weights_only=True)`` accepts (plain
  tensors) is ever loaded, by transformers; anything else is refused with the reason, never executed.

Every loader (model folders, heads, checkpoints, stores) reads safetensors through
:func:`load_safetensors`, and calls :func:`check_model_folder` before handing a folder to transformers.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from vembed.errors import VembedError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def check_safetensors(path: str | Path) -> None:
    """Raise :class:`VembedError` naming ``path`` unless its header is valid and covers the file."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{size} bytes, too short for a header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(fh.read(length))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise VembedError(f"{path}: not a valid safetensors file ({exc})") from None
    expected = 8 + length + end
    if size < expected:
        raise VembedError(
            f"{path}: truncated ({size:,} of {expected:,} bytes); copy or download it again, or re-export"
        )


def load_safetensors(path: str | Path, device: str = "cpu") -> dict:
    """``safetensors.torch.load_file`` after :func:`check_safetensors`; any failure names ``path``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise VembedError(f"{path}: weights file not found")
    check_safetensors(path)
    try:
        return load_file(str(path), device=device)
    except SafetensorError as exc:
        raise VembedError(f"{path}: unreadable safetensors file ({exc})") from None


def check_model_folder(folder: str | Path) -> None:
    """Check a local model folder's weight files before transformers reads them.

    Every ``*.safetensors`` file is checked (:func:`check_safetensors`). A folder with only pickled
    weights is allowed (transformers loads them with ``weights_only=True``); see :func:`refusal`.
    """
    folder = Path(folder)
    for file in sorted(folder.glob("*.safetensors")):
        check_safetensors(file)


def refusal(folder: str | Path, exc: BaseException) -> VembedError | None:
    """The one-line error for a failure of ``from_pretrained(folder)``, or ``None`` if not a weights one.

    A pickle that ``weights_only=True`` refuses (it holds code or objects, not just tensors) is
    named with the reason; a safetensors failure names the file at fault.
    """
    import pickle

    from safetensors import SafetensorError

    folder = Path(folder)
    if isinstance(exc, pickle.UnpicklingError):
        pickles = [p for p in sorted(folder.glob("*")) if p.suffix in PICKLE_SUFFIXES] or [folder]
        names = ", ".join(str(p) for p in pickles)
        return VembedError(
            f"{names}: refused: pickled weights that are not a plain tensor state dict (loading them "
            "would run code from the file; vembed never does). Save the model as model.safetensors "
            "where you trust it: model.save_pretrained(folder, safe_serialization=True)"
        )
    if isinstance(exc, SafetensorError):
        if folder.is_dir():
            check_model_folder(folder)  # names the broken file when it is one of ours
        return VembedError(f"{folder}: unreadable safetensors weights ({exc})")
    return None
