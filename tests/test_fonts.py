"""Captions in any script: DejaVu for Latin/Greek/Cyrillic, a system font for the rest, else one warning."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import class_image
from PIL import Image
from rich.console import Console

from vembed import console as vconsole
from vembed import fonts
from vembed.index.grid import draw_captioned

NOT_A_CHARACTER = "\U000e01ef"  # no font has a glyph for it: renders as the .notdef box


def _glyph(font, char: str) -> bytes:
    return bytes(font.getmask(char))


@pytest.mark.parametrize("char", ["é", "è", "ß", "Ω", "Ж"])
def test_accented_latin_greek_and_cyrillic_are_real_glyphs_not_boxes(char):
    label = fonts.LabelFonts(16)
    font = label.font(f"café crème {char}")
    assert _glyph(font, char) != _glyph(font, NOT_A_CHARACTER)
    assert label.missing == []


def test_a_script_dejavu_lacks_takes_the_system_font_that_covers_it(monkeypatch):
    dejavu = fonts.dejavu_path()
    other = dejavu.replace("DejaVuSans.ttf", "DejaVuSans-Bold.ttf")
    monkeypatch.setattr(fonts, "system_fonts", lambda: ("/nowhere/none.ttf", other))
    real = fonts.charmap
    monkeypatch.setattr(fonts, "charmap", lambda p: real(p) | {ord("月")} if p == other else real(p))
    label = fonts.LabelFonts(16)
    assert label.path_for("label 月") == other
    assert label.path_for("café") == dejavu
    assert label.missing == []


def test_labels_no_font_covers_are_named_once(tmp_path, monkeypatch):
    monkeypatch.setattr(fonts, "system_fonts", lambda: ())
    out = io.StringIO()
    monkeypatch.setattr(vconsole, "console", Console(file=out, width=300))
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        class_image(i, i).save(paths[-1])
    items = [(p, ("label 月", "café crème"), (0, 0, 0)) for p in paths]
    picture = draw_captioned(items, tmp_path / "grid.png", thumb=64)
    text = out.getvalue()
    assert text.count("warning") == 1 and "'label 月'" in text and "café" not in text
    assert np.asarray(Image.open(picture)).shape[2] == 3


def test_a_cjk_system_font_is_used_when_one_is_installed():
    found = [p for p in fonts.system_fonts() if ord("月") in fonts.charmap(p)]
    if not found:
        pytest.skip("no installed font has CJK glyphs on this machine")
    label = fonts.LabelFonts(16)
    font = label.font("月")
    assert _glyph(font, "月") != _glyph(font, NOT_A_CHARACTER) and label.missing == []
