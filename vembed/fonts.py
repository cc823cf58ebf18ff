"""Fonts for the text vembed draws into pictures (grid captions: file names, labels, class names).

DejaVu Sans, which ships with matplotlib, covers accented Latin, Greek and Cyrillic; for a label in a
script it lacks (Chinese, Japanese, Korean, ...) the first system font that covers every character of
it is used; a label no installed font covers is drawn with DejaVu (missing glyphs show as boxes) and
named once in a warning.
"""

from __future__ import annotations

from functools import cache, lru_cache
from pathlib import Path

from vembed.console import log

# system fonts likely to cover many scripts are tried first
_WIDE = (
    "cjk",
    "han",
    "wqy",
    "wenquanyi",
    "droidsansfallback",
    "unifont",
    "noto",
    "gothic",
    "mincho",
    "arphic",
)


@lru_cache(maxsize=1)
def dejavu_path() -> str | None:
    """matplotlib's DejaVu Sans, or None (then Pillow's built-in font is used)."""
    try:
        import matplotlib
    except ImportError:
        return None
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return str(path) if path.is_file() else None


@lru_cache(maxsize=1)
def system_fonts() -> tuple[str, ...]:
    """Font files installed on this machine (TrueType/OpenType, collections too), wide ones first."""
    try:
        from matplotlib import font_manager
    except ImportError:
        return ()
    paths = sorted(set(font_manager.findSystemFonts(fontext="ttf")))
    return tuple(sorted(paths, key=lambda p: not any(w in Path(p).name.lower() for w in _WIDE)))


@cache
def charmap(path: str) -> frozenset[int]:
    """The code points a font file has glyphs for (empty when it cannot be read)."""
    try:
        from matplotlib.ft2font import FT2Font

        return frozenset(FT2Font(path).get_charmap())
    except Exception:  # an unreadable or exotic font file is simply not used
        return frozenset()


def covers(path: str | None, text: str) -> bool:
    return path is not None and {ord(c) for c in text if not c.isspace()} <= charmap(path)


@lru_cache(maxsize=64)
def _truetype(path: str | None, size: int):
    from PIL import ImageFont

    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


class LabelFonts:
    """One size of caption font for a picture: :meth:`font` picks one per text; :meth:`warn` says once
    which texts no installed font covers."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.missing: list[str] = []

    @property
    def primary(self):
        return _truetype(dejavu_path(), self.size)

    def path_for(self, text: str) -> str | None:
        """The font file used for ``text``: DejaVu when it covers it, else the first system font that does."""
        primary = dejavu_path()
        if text.isascii() or covers(primary, text):
            return primary
        for path in system_fonts():
            if covers(path, text):
                return path
        if text not in self.missing:
            self.missing.append(text)
        return primary

    def font(self, text: str):
        return _truetype(self.path_for(text), self.size)

    def warn(self, what: str = "grid") -> None:
        if self.missing:
            shown = ", ".join(repr(t) for t in self.missing[:5]) + (" ..." if len(self.missing) > 5 else "")
            log(
                f"[yellow]warning:[/] {what}: no installed font has every character of {len(self.missing)} "
                f"caption(s), drawn with boxes for the missing ones: {shown} "
                "(install a font for that script, e.g. fonts-noto-cjk)"
            )


@lru_cache(maxsize=1)
def matplotlib_families() -> tuple[str, ...]:
    """``font.family`` for matplotlib figures: DejaVu Sans, then installed wide-coverage families
    (matplotlib falls back glyph by glyph along the list, so CJK class names draw where a font has them)."""
    from matplotlib import font_manager

    wide = [
        f.name
        for f in font_manager.fontManager.ttflist
        if any(w in Path(f.fname).name.lower() for w in _WIDE) and f.name != "DejaVu Sans"
    ]
    return ("DejaVu Sans", *dict.fromkeys(wide))
