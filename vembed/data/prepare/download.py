"""Getting public data sets: plain HTTP downloads, Kaggle through kagglehub, and archive extraction.

These two functions are the only network boundary of ``vembed prepare`` (tests replace them).
"""

from __future__ import annotations

import tarfile
import urllib.error
import urllib.request
import zipfile
from collections import deque
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from vembed.console import console, log
from vembed.errors import VembedError
from vembed.io import atomic_dir, atomic_path

CHUNK = 1 << 20


def download_url(url: str, dest: str | Path, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (kept as a cache: an existing ``dest`` is not fetched again).

    The bytes go to a temporary file renamed onto ``dest`` when complete, so an interrupted download
    never looks finished.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    log(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(dest) as tmp:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn())
            with (
                Progress(*columns, TransferSpeedColumn(), console=console) as bar,
                open(tmp, "wb") as fh,
            ):
                task = bar.add_task(dest.name, total=total)
                while chunk := response.read(CHUNK):
                    fh.write(chunk)
                    bar.advance(task, len(chunk))
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise VembedError(
            f"could not download {url}: {reason} (no network? download it by hand into {dest.parent}, "
            "or pass --root with a local copy)"
        ) from None
    return dest


def kaggle_download(slug: str) -> Path:
    """Download (or reuse kagglehub's cached copy of) a Kaggle data set; return its local folder."""
    if slug.count("/") != 1 or not all(slug.split("/")):
        raise VembedError(f"Kaggle data set {slug!r} should look like OWNER/NAME")
    try:
        import kagglehub
    except ImportError:
        raise VembedError("kagglehub is not installed: pip install kagglehub (or pass --root)") from None
    log(f"fetching Kaggle data set [bold]{slug}[/] with kagglehub")
    try:
        path = kagglehub.dataset_download(slug)
    except Exception as exc:  # kagglehub raises many types (HTTP, auth, not found)
        raise VembedError(
            f"could not download Kaggle data set {slug}: {type(exc).__name__}: {exc} "
            "(Kaggle needs network access and credentials: KAGGLE_USERNAME/KAGGLE_KEY or "
            "~/.kaggle/kaggle.json; or pass --root with a local copy)"
        ) from None
    return Path(path)


def require_dir_containing(root: Path, *names: str, shown: str, layout: str) -> Path:
    """:func:`find_dir_containing`, or an error naming what was looked for (``shown``) and the expected
    official ``layout``."""
    folder = find_dir_containing(root, *names)
    if folder is None:
        raise VembedError(
            f"{root}: no folder with {shown} (looked four levels down); expected the official {layout} layout"
        )
    return folder


def find_dir_containing(root: str | Path, *names: str, max_depth: int = 4) -> Path | None:
    """The shallowest folder under ``root`` that holds every one of ``names`` (breadth first)."""
    root = Path(root)
    queue: deque[tuple[Path, int]] = deque([(root, 0)])
    while queue:
        folder, depth = queue.popleft()
        if all((folder / name).exists() for name in names):
            return folder
        if depth < max_depth:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            queue.extend((child, depth + 1) for child in children)
    return None


def extract_tar(archive: str | Path, dest: str | Path) -> Path:
    """Extract ``archive`` into the folder ``dest`` as a whole (a partial extraction never remains)."""
    archive, dest = Path(archive), Path(dest)
    log(f"extracting {archive.name} into {dest}")
    try:
        with atomic_dir(dest) as tmp, tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python < 3.10.12: refuse members that would land outside the folder
                for member in tar.getmembers():
                    target = (tmp / member.name).resolve()
                    if not target.is_relative_to(tmp.resolve()) or member.issym() or member.islnk():
                        raise VembedError(f"{archive}: unsafe member {member.name!r}")
                tar.extractall(tmp)  # noqa: S202 - checked above
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise VembedError(f"{archive}: cannot extract ({exc}); delete it to download it again") from None
    return dest


def extract_zip(archive: str | Path, dest: str | Path) -> Path:
    """Extract a zip ``archive`` into the folder ``dest`` as a whole (members outside it are refused)."""
    archive, dest = Path(archive), Path(dest)
    log(f"extracting {archive.name} into {dest}")
    try:
        with atomic_dir(dest) as tmp, zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                target = (tmp / member).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise VembedError(f"{archive}: unsafe member {member!r}")
            zf.extractall(tmp)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise VembedError(f"{archive}: cannot extract ({exc}); delete it to download it again") from None
    return dest


def dataset_root(
    root: str | Path | None, kaggle: str | None, *, url: str, out: Path, folder: str, name: str
) -> Path:
    """Where a public data set lies: ``--root``, a ``--kaggle`` copy, or ``url``'s archive downloaded
    and extracted (zip or tar) once into ``out/downloads/folder``."""
    if root is not None and kaggle is not None:
        raise VembedError("give either --root or --kaggle, not both")
    if root is not None:
        base = Path(root)
    elif kaggle is not None:
        base = kaggle_download(kaggle)
    else:
        archive = download_url(url, out / "downloads" / url.rsplit("/", 1)[-1])
        base = out / "downloads" / folder
        if not base.is_dir():
            (extract_zip if archive.name.endswith(".zip") else extract_tar)(archive, base)
    if not base.is_dir():
        raise VembedError(f"{name} root not found: {base}")
    return base
