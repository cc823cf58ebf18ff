"""Atomic file writing: every file vembed writes goes through here (temp file, then rename)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched, so a crash or a
    kill never leaves a half-written file under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp (and safetensors) make 0600
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Atomically write one JSON object per line."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
    return Path(path)


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON line to a log (e.g. metrics.jsonl): O(1) per row, no fsync.

    Logs are the one exception to the atomic writes: a kill can cut the last line short, so readers skip
    a line that does not parse, and whoever resumes the log rewrites it with :func:`write_jsonl`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")


def write_image(path: str | os.PathLike, image: Any, *, format: str = "PNG", **options: Any) -> Path:
    """Atomically save a ``PIL.Image`` (a PNG unless ``format`` says otherwise)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format=format, **options)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` as a whole.

    An existing ``path`` is swapped out only after the new directory is complete, so readers see
    either the old folder or the new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        make_readable(tmp)
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path``, an older folder there swapped out whole (then removed)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)


def check_output_path(path: str | os.PathLike, *, folder: bool = False, what: str = "output") -> Path:
    """Raise :class:`VembedError` now, before any work, if ``path`` cannot be written later.

    Refused: a folder where a file goes (``folder=False``) or a file where a folder goes, a file in
    the way of a parent folder, and a parent folder this user may not write in.
    """
    from vembed.errors import VembedError

    path = Path(path)
    if path.is_dir() and not folder:
        raise VembedError(f"{what} {path}: is a folder; give a file name")
    if path.exists() and not path.is_dir() and folder:
        raise VembedError(f"{what} {path}: is a file; give a folder")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise VembedError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VembedError(f"{what} {path}: cannot write in {parent} (permission denied)")
    return path


def read_json(path: str | os.PathLike, *, missing: Any = None) -> Any:
    """Parse a JSON file; ``missing`` when it does not exist; invalid JSON (or text that is not UTF-8)
    is a :class:`~vembed.errors.VembedError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return missing
    return parse_json(read_text(path), path)


def parse_json(text: str, path: str | os.PathLike) -> Any:
    """``json.loads(text)``; invalid JSON is a :class:`~vembed.errors.VembedError` naming ``path`` and line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        from vembed.errors import VembedError

        raise VembedError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:  # thousands of nested brackets
        from vembed.errors import VembedError

        raise VembedError(f"{path}: invalid JSON (nested too deeply)") from None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents (a leading BOM dropped); bytes that are not UTF-8 are a
    :class:`~vembed.errors.VembedError` naming the file and line."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        from vembed.errors import VembedError

        line = data[: exc.start].count(b"\n") + 1
        raise VembedError(f"{path}:{line}: {not_utf8(exc)}") from None


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of a UTF-8 file, read lazily (a BOM on line 1 dropped); a
    line that is not UTF-8 is a :class:`~vembed.errors.VembedError` naming ``file:line``."""
    for lineno, raw in raw_lines(path):
        yield lineno, decode_line(raw, f"{path}:{lineno}")


def raw_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes)`` of each line of a file (a UTF-8 BOM on line 1 dropped); decode each
    with :func:`decode_line` (a reader that skips bad lines decodes inside its own ``try``)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            yield lineno, raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw


def decode_line(raw: bytes, where: str) -> str:
    """One line's bytes as UTF-8 text; otherwise a :class:`~vembed.errors.VembedError` naming ``where``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        from vembed.errors import VembedError

        raise VembedError(f"{where}: {not_utf8(exc)}") from None


def not_utf8(exc: UnicodeDecodeError) -> str:
    """What is wrong with text that failed to decode (the caller adds the file and line)."""
    byte = exc.object[exc.start : exc.start + 1].hex()
    return f"not UTF-8 text (byte 0x{byte} cannot be decoded); save the file as UTF-8"


@contextlib.contextmanager
def process_lock(path: str | os.PathLike, *, what: str) -> Iterator[Path]:
    """Hold the lock file ``path`` (it holds this host and process id) while the block runs.

    Another live process holding it is a :class:`~vembed.errors.VembedError` naming ``what`` and that
    process' id; a lock left by a process that no longer runs (``kill -9``) is taken over.
    """
    from vembed.errors import VembedError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is None:  # its process is gone
                path.unlink(missing_ok=True)
                continue
            host, pid = holder
            where = "" if host in (_host(), "") else f" on {host}"
            raise VembedError(
                f"{what}: another process (pid {pid}{where}) is writing it; wait for it to finish, or remove "
                f"{path} if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{_host()} {os.getpid()}\n")
        break
    else:
        raise VembedError(f"{what}: cannot take the lock {path}")
    try:
        yield path
    finally:
        if _lock_holder(path) == (_host(), os.getpid()):
            path.unlink(missing_ok=True)


def _lock_holder(path: Path) -> tuple[str, int | str] | None:
    """``(host, pid)`` of the process holding lock ``path``; ``None`` when it no longer runs (or the
    lock is gone). A lock being written (empty) or of another host counts as held."""
    try:
        parts = path.read_text(encoding="utf-8", errors="replace").split()
    except FileNotFoundError:
        return None
    if len(parts) != 2 or not parts[1].isdigit():
        return ("", "unknown")
    host, pid = parts[0], int(parts[1])
    if host == _host() and not _alive(pid):
        return None
    return host, pid


def make_readable(folder: str | os.PathLike) -> None:
    """Give the files in ``folder`` the umask's permissions (libraries such as transformers 5 and
    safetensors save files as 0600, which hides a model folder or a store from the other users it is
    meant for)."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries beside ``path`` that a killed process left (``kill -9`` runs no cleanup).

    A temporary's name holds the host and process id that made it; one whose process no longer runs
    on this host is removed. Returns what was removed.
    """
    path = Path(path)
    host = _host()
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 :].split(".")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_host()}.{os.getpid()}."


def _host() -> str:
    return socket.gethostname().split(".")[0].replace("/", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
