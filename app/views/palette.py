"""Expert colours.

Up to 8 experts: Okabe & Ito's colour-blind-safe palette (black swapped for a
grey so text stays readable). Beyond 8 no palette stays distinguishable for
every reader, so colour is never the only cue: every view also prints the
expert's number next to its colour.
"""
from __future__ import annotations

from bokeh.palettes import Bright7, Colorblind8, Muted9

OKABE_ITO = [c if c != "#000000" else "#7F7F7F" for c in Colorblind8]
_EXTRA = [c for c in (*Muted9, *Bright7, "#5D3A9B", "#1B7837", "#8C510A", "#01665E", "#762A83", "#B35806",
                      "#2D004B", "#7F3B08", "#4D9221", "#C51B7D", "#35978F") if c not in OKABE_ITO]


def expert_colors(n: int) -> list[str]:
    """n distinct colours, colour-blind-safe when n <= 8."""
    base = OKABE_ITO + _EXTRA
    return [base[i % len(base)] for i in range(n)]


def luminance(color: str) -> float:
    """WCAG 2.x relative luminance of a #RRGGBB colour."""
    r, g, b = (int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))

    def lin(c):
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two #RRGGBB colours (1 to 21; AA body text needs 4.5)."""
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_color(background: str) -> str:
    """Black or white, whichever contrasts more with `background` (WCAG relative luminance)."""
    lum = luminance(background)
    return "#000000" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "#FFFFFF"


def tint(color: str, amount: float = 0.55) -> str:
    """Mix `color` with white: a light background that keeps dark text readable."""
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    mix = [round(c + (255 - c) * amount) for c in (r, g, b)]
    return "#{:02X}{:02X}{:02X}".format(*mix)
