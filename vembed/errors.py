"""The one exception type vembed raises for mistakes a user can fix."""

from __future__ import annotations

_WORKER = " in DataLoader worker process "


class VembedError(Exception):
    """A user-facing error: the message names the file, line, key or value that is wrong.

    The CLI prints it as one line and exits non-zero; library users can catch it.

    Raised in a DataLoader worker, torch re-raises it in the main process as
    ``VembedError("Caught VembedError in DataLoader worker process 0. Original Traceback ...")``;
    the message is cut back to the original one, so a bad image says the same line with workers as
    without (``data.num_workers=0``).
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and _WORKER in args[0]:
            args = (_original_message(args[0], type(self)),)
        super().__init__(*args)


def _original_message(text: str, cls: type) -> str:
    """The message of the exception whose formatted traceback ``text`` (torch's wrapper) holds."""
    for name in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        if name in text:
            return text.rsplit(name, 1)[1].strip()
    return text


class Interrupted(Exception):
    """A stop signal (SIGTERM, Ctrl-C) ended the work cleanly: what was done is saved (the message says
    where and how to continue). Reported as one yellow line, exit status 130."""
