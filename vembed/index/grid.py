"""Retrieval results as one PNG: a row per query, its image then its top-k thumbnails.

Borders: blue for the query; green when a hit has the query's label, red when it has another, grey
when either label is unknown. Under each thumbnail: the rank, the score and the label.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from vembed.console import log
from vembed.data.images import load_image
from vembed.errors import VembedError
from vembed.fonts import LabelFonts
from vembed.index.search import QueryResult
from vembed.io import atomic_path

QUERY = (40, 90, 220)
MATCH = (20, 160, 60)
MISMATCH = (210, 30, 30)
UNKNOWN = (150, 150, 150)
BACKGROUND = (255, 255, 255)
CELL_BACKGROUND = (235, 235, 235)
TEXT = (20, 20, 20)
BORDER = 4
GAP = 6
SEPARATOR = 14  # extra space between the query column and its hits


def border_colour(query_label, hit_label) -> tuple[int, int, int]:
    """Green when the labels agree, red when they differ, grey when one is unknown."""
    if query_label is None or hit_label is None:
        return UNKNOWN
    return MATCH if str(query_label) == str(hit_label) else MISMATCH


def draw_grid(
    results: Sequence[QueryResult],
    out: str | Path,
    *,
    thumb: int = 128,
    max_rows: int = 64,
) -> Path:
    """Draw ``results`` (at most ``max_rows`` queries) and write the PNG atomically to ``out``."""
    if not results:
        raise VembedError("no search results to draw")
    if thumb < 16:
        raise VembedError(f"grid thumbnail size must be at least 16 pixels, got {thumb}")
    if len(results) > max_rows:
        log(f"grid: drawing the first {max_rows} of {len(results)} queries")
        results = results[:max_rows]
    font = LabelFonts(max(10, thumb // 10))
    line = _text_height(font.primary) + 2
    cell_w, cell_h = thumb + 2 * BORDER, thumb + 2 * BORDER + 2 * line + 2
    columns = 1 + max(len(r.hits) for r in results)
    width = GAP + cell_w + SEPARATOR + (columns - 1) * (cell_w + GAP)
    height = GAP + len(results) * (cell_h + GAP)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    unreadable: list[str] = []
    for row, result in enumerate(results):
        y = GAP + row * (cell_h + GAP)
        query = result.query
        caption = (
            f"query {query.path.name if query.path is not None else query.name}",
            _label_text(query.label),
        )
        image = _thumbnail(query.path, thumb, unreadable) if query.path is not None else None
        _cell(canvas, draw, (GAP, y), image, QUERY, caption, thumb, font, line)
        for col, hit in enumerate(result.hits):
            x = GAP + cell_w + SEPARATOR + col * (cell_w + GAP)
            image = _thumbnail(Path(hit.path), thumb, unreadable)
            caption = (f"#{hit.rank}  {hit.score:.3f}", _label_text(hit.label))
            _cell(
                canvas, draw, (x, y), image, border_colour(query.label, hit.label), caption, thumb, font, line
            )
    if unreadable:
        shown = ", ".join(unreadable[:3]) + (" ..." if len(unreadable) > 3 else "")
        log(
            f"[yellow]warning:[/] grid: {len(unreadable)} image(s) could not be read and are crossed out: {shown}"
        )
    font.warn()
    out = Path(out)
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
    return out


def _cell(canvas, draw, origin, image, colour, caption, thumb, font, line) -> None:
    x, y = origin
    size = thumb + 2 * BORDER
    draw.rectangle((x, y, x + size - 1, y + size - 1), fill=colour)
    draw.rectangle(
        (x + BORDER, y + BORDER, x + BORDER + thumb - 1, y + BORDER + thumb - 1), fill=CELL_BACKGROUND
    )
    if image is not None:
        canvas.paste(
            image, (x + BORDER + (thumb - image.width) // 2, y + BORDER + (thumb - image.height) // 2)
        )
    else:  # unreadable image (or a query given as an embedding): cross the cell out
        a, b = x + BORDER, x + BORDER + thumb - 1
        draw.line((a, y + BORDER, b, y + BORDER + thumb - 1), fill=UNKNOWN, width=2)
        draw.line((a, y + BORDER + thumb - 1, b, y + BORDER), fill=UNKNOWN, width=2)
    for i, text in enumerate(caption):
        if text:
            face = font.font(text)
            draw.text((x, y + size + 1 + i * line), _fit(draw, text, face, size), fill=TEXT, font=face)


def _thumbnail(path: Path, thumb: int, unreadable: list[str]) -> Image.Image | None:
    try:
        return ImageOps.contain(load_image(path, min_size=thumb), (thumb, thumb))
    except VembedError:
        unreadable.append(str(path))
        return None


def _label_text(label) -> str:
    return "" if label is None else f"label {label}"


def _fit(draw, text: str, font, width: int) -> str:
    """Shorten ``text`` with "..." until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _text_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag#1")
    return int(bottom - min(top, 0))


def draw_captioned(
    items: Sequence[tuple[Path, tuple[str, ...], tuple[int, int, int]]],
    out: str | Path,
    *,
    columns: int = 6,
    thumb: int = 160,
    max_items: int = 96,
) -> Path:
    """Images in rows of ``columns``, each with a coloured border and caption lines (e.g. predictions)."""
    if not items:
        raise VembedError("no images to draw")
    if len(items) > max_items:
        log(f"grid: drawing the first {max_items} of {len(items)} images")
        items = items[:max_items]
    font = LabelFonts(max(10, thumb // 12))
    line = _text_height(font.primary) + 2
    lines = max(len(caption) for _, caption, _ in items)
    cell_w, cell_h = thumb + 2 * BORDER, thumb + 2 * BORDER + lines * line + 2
    columns = max(1, min(columns, len(items)))
    rows = (len(items) + columns - 1) // columns
    canvas = Image.new("RGB", (GAP + columns * (cell_w + GAP), GAP + rows * (cell_h + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    unreadable: list[str] = []
    for i, (path, caption, colour) in enumerate(items):
        origin = (GAP + (i % columns) * (cell_w + GAP), GAP + (i // columns) * (cell_h + GAP))
        _cell(
            canvas,
            draw,
            origin,
            _thumbnail(Path(path), thumb, unreadable),
            colour,
            caption,
            thumb,
            font,
            line,
        )
    if unreadable:
        log(f"[yellow]warning:[/] grid: {len(unreadable)} image(s) could not be read and are crossed out")
    font.warn()
    out = Path(out)
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
    return out
