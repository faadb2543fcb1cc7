"""Accessibility checks that need no browser: colour contrast of every text style we declare (WCAG AA)."""
from __future__ import annotations

import re

import pytest

from app.views.palette import contrast, expert_colors, text_color, tint
from moe_core.model.checkpoint import ASSETS

CSS_FILES = [ASSETS / "page.css", ASSETS / "app.css", ASSETS / "quiz.css"]
PAGE_BACKGROUNDS = ["#FFFFFF", "#F4F6F9"]          # the page and the .stat / .strip tiles


def _vars(css: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"--([\w-]+):\s*(#[0-9a-fA-F]{6})", css)}


def _rules(css: str):
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    for m in re.finditer(r"([^{}]+)\{([^{}]*)\}", css):
        yield m.group(1).strip(), m.group(2)


def _colour(decl: str, prop: str, variables: dict) -> str | None:
    m = re.search(rf"(?<![\w-]){prop}\s*:\s*(var\(--([\w-]+)\)|#[0-9a-fA-F]{{6}})", decl)
    if not m:
        return None
    return variables[m.group(2)] if m.group(2) else m.group(1)


def _pairs():
    variables = {}
    for f in CSS_FILES:
        variables.update(_vars(f.read_text(encoding="utf-8")))
    out = []
    for f in CSS_FILES:
        for selector, decl in _rules(f.read_text(encoding="utf-8")):
            fg = _colour(decl, "color", variables)
            if fg is None:
                continue
            bg = _colour(decl, "background(?:-color)?", variables)
            for b in [bg] if bg else PAGE_BACKGROUNDS:
                out.append((f"{f.name}: {selector}", fg, b))
    return out


PAIRS = _pairs()


def test_the_css_declares_text_colours_to_check():
    assert len(PAIRS) >= 10


@pytest.mark.parametrize("where, fg, bg", PAIRS, ids=[p[0][:60] for p in PAIRS])
def test_every_text_colour_meets_wcag_aa(where, fg, bg):
    assert contrast(fg, bg) >= 4.5, f"{where}: {fg} on {bg} is {contrast(fg, bg):.2f}:1"


@pytest.mark.parametrize("n", [4, 8, 16, 32])
def test_token_text_on_every_expert_tint_meets_wcag_aa(n):
    for c in expert_colors(n):
        bg = tint(c)
        assert contrast(text_color(bg), bg) >= 4.5, (c, bg)


def test_lesson_frame_and_focus_ring_are_visible_against_white():
    # WCAG 1.4.11: user-interface parts and focus indicators need 3:1
    assert contrast("#B35806", "#FFFFFF") >= 3.0
    assert contrast("#1A56DB", "#FFFFFF") >= 3.0
