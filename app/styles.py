"""The app's stylesheets, read once. Panes live in shadow roots, so each pane carries the CSS it uses:
the first screen's panes only the small PAGE_CSS, the views opened later the full CSS."""
from __future__ import annotations

from moe_core.model.checkpoint import ASSETS

PAGE_CSS = (ASSETS / "page.css").read_text(encoding="utf-8")    # header, intro, controls, lesson card, basics
CSS = PAGE_CSS + (ASSETS / "app.css").read_text(encoding="utf-8")   # + the detail views' tables and panels
QUIZ_CSS = CSS + (ASSETS / "quiz.css").read_text(encoding="utf-8")

__all__ = ["PAGE_CSS", "CSS", "QUIZ_CSS"]
