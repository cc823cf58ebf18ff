"""The one place a failure becomes what the user sees: every command of the app runs inside it.

- :class:`~vembed.errors.VembedError` (a mistake the user can fix) and an ``OSError`` naming a file
  (missing, unreadable, a folder where a file was expected, disk full) → one red line, exit status 2.
- Ctrl-C → ``interrupted``, exit status 130; a closed pipe (``vembed ... | head``) → silence, 141.
- Anything else is a bug → one line naming the exception and a log file holding the full traceback,
  exit status 1. ``--debug`` (anywhere on the command line) or ``VEMBED_DEBUG=1`` prints the
  traceback instead.

Commands get this by being registered on the app (or on a group added to it): nothing to decorate.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from pathlib import Path

import typer
from rich.markup import escape
from typer.core import TyperGroup, TyperOption

from vembed.console import console
from vembed.errors import Interrupted, VembedError

EXPECTED_EXIT = 2
BUG_EXIT = 1
INTERRUPTED_EXIT = 130
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader left
DEBUG_FLAG = "--debug"


def debug_enabled() -> bool:
    return os.environ.get("VEMBED_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def log_dir() -> Path:
    """``$VEMBED_LOG_DIR``, else ``$XDG_CACHE_HOME/vembed/logs`` (``~/.cache/vembed/logs``)."""
    if os.environ.get("VEMBED_LOG_DIR"):
        return Path(os.environ["VEMBED_LOG_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "vembed" / "logs"


def report(exc: BaseException) -> int:
    """Print what the user should see for ``exc``; return the exit status."""
    if isinstance(exc, KeyboardInterrupt):
        console.print("[yellow]interrupted[/]")
        return INTERRUPTED_EXIT
    if isinstance(exc, Interrupted):  # stopped by a signal, its state saved (e.g. a training checkpoint)
        console.print(f"[yellow]{escape(str(exc))}[/]", highlight=False, soft_wrap=True)
        return INTERRUPTED_EXIT
    if isinstance(exc, VembedError):
        _error_line(str(exc))
        return EXPECTED_EXIT
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        _error_line(f"{exc.filename}: {exc.strerror}")
        return EXPECTED_EXIT
    if isinstance(exc, MemoryError):
        _error_line("out of memory (try a smaller data.batch_size, or fewer data.num_workers)")
        return EXPECTED_EXIT
    text = traceback.format_exc()
    if debug_enabled():
        sys.stderr.write(text)
        return BUG_EXIT
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    where = _write_log(text)
    saved = f"the full traceback is in {where}" if where else "the traceback could not be saved"
    _error_line(
        f"unexpected {type(exc).__name__}: {first} — {saved}; rerun with --debug to print it "
        "(this is a bug in vembed: please report it with that log)"
    )
    return BUG_EXIT


class VembedGroup(TyperGroup):
    """The app's root group: strips ``--debug``, runs every subcommand inside :func:`report` and
    checks its output paths first (:func:`guard_outputs`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        guard_outputs(self)

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if DEBUG_FLAG in args:
            cut = args.index("--") if "--" in args else len(args)
            if DEBUG_FLAG in args[:cut]:
                args = [a for a in args[:cut] if a != DEBUG_FLAG] + args[cut:]
                os.environ["VEMBED_DEBUG"] = "1"  # also seen by accelerate's worker processes
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # `vembed ... | head`: the reader left; stop quietly, as a pipe expects
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # Python's final flush must not raise again
            raise typer.Exit(BROKEN_PIPE_EXIT) from None
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 (the one place that reports)
            if _is_click(exc):  # usage errors, typer.Exit, typer.Abort: click reports them itself
                raise
            raise typer.Exit(report(exc)) from None


def _is_click(exc: BaseException) -> bool:
    """An exception of click's (or typer's vendored copy of click's) own control flow."""
    return type(exc).__module__.split(".")[0] in ("click", "typer")


def _error_line(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _write_log(text: str) -> Path | None:
    from vembed import __version__
    from vembed.io import write_text

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = log_dir() / f"vembed-{stamp}-{os.getpid()}.log"
    header = f"vembed {__version__}, python {sys.version.split()[0]}\ncommand: {' '.join(sys.argv)}\n\n"
    try:
        return write_text(path, header + text)
    except OSError:
        return None


# -- output paths checked before any work ---------------------------------------------------------

OUTPUT_OPTIONS = ("--json", "--grid", "--plot", "--out", "--output-dir")


def guard_outputs(command) -> None:
    """Check the command's output options (``--json``, ``--grid``, ``--plot``, ``--out``,
    ``--output-dir``) with :func:`vembed.io.check_output_path` before its callback runs.

    ``--output-dir`` and an ``--out`` whose help says folder/directory are folders; the others files.
    Applied to every command of the app by :class:`VembedGroup`, so new commands get it too.
    """
    if hasattr(command, "commands"):  # a group
        for sub in command.commands.values():
            guard_outputs(sub)
        return
    outputs = {}
    for param in command.params:
        names = [o for o in getattr(param, "opts", []) if o in OUTPUT_OPTIONS]
        if names and isinstance(param, TyperOption) and not param.is_flag:
            text = (param.help or "").lower()
            folder = names[0] == "--output-dir" or (
                names[0] == "--out" and ("folder" in text or "director" in text)
            )
            outputs[param.name] = (names[0], folder)
    callback = command.callback
    if not outputs or callback is None or getattr(callback, "_outputs_guarded", False):
        return

    @functools.wraps(callback)
    def checked(*args, **kwargs):
        from vembed.io import check_output_path

        for name, (option, folder) in outputs.items():
            value = kwargs.get(name)
            if value is not None and str(value) != "-":
                check_output_path(value, folder=folder, what=option)
        return callback(*args, **kwargs)

    checked._outputs_guarded = True
    command.callback = checked
