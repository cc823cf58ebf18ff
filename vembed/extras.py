"""Optional dependencies: import one, or say in one line which ``pip install`` brings it."""

from __future__ import annotations

import importlib
from types import ModuleType

from vembed.errors import VembedError


def require(module: str, extra: str, *, what: str) -> ModuleType:
    """Import ``module`` or raise a :class:`VembedError` naming ``pip install 'vembed[extra]'``.

    ``what`` is the feature that needs it (``"vembed serve"``), for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise VembedError(
            f"{what} needs the {module.split('.')[0]} package: pip install 'vembed[{extra}]'"
        ) from None
