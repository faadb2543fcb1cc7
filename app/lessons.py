"""Guided lessons: short sequences of steps that set up the app and point at one view.

Each lesson is a Markdown file in `assets/lessons/` (our text, not user text):

    # Title
    One-line summary.
    ---
    <!-- {"tab": "params", "highlight": "counters", "set": {"model": "moe-n8", "k": "2"}} -->
    ## Step title
    Step text with {placeholders} filled from the live model.
    ---
    ...

`set` uses the share-link vocabulary (`app/share.py`), so a step is exactly the
view a link would open, validated the same way. Placeholders are computed from
the RouterState's current result (`lesson_numbers`): every number a lesson
quotes comes from the loaded model at that moment, never from the text file.
No Panel imports: LessonState is driven by the dashboard and tested with pytest.
"""
from __future__ import annotations

import html
import json
import math
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache

import param

from moe_core.model.checkpoint import ASSETS

from .share import TABS, apply_to_state, parse_query

LESSON_DIR = ASSETS / "lessons"
HIGHLIGHTS = ("decide", "tokens", "load", "counters", "params", "published", "walkthrough", "heatmap", "flow",
              "detail", "balance", "explainer", "lab", "profiles", "compare", "scale", "quiz")
_SETTINGS = re.compile(r"^\s*<!--\s*(\{.*\})\s*-->\s*$")


@dataclass
class Step:
    title: str
    body: str                       # Markdown with {placeholders}
    tab: str = "router"
    highlight: str | None = None
    settings: dict = field(default_factory=dict)   # share-link style query values


@dataclass
class Lesson:
    slug: str
    title: str
    summary: str
    steps: list[Step]


def parse_lesson(slug: str, text: str) -> Lesson:
    """Parse one lesson file; ValueError names the file and the problem."""
    chunks = [c.strip() for c in re.split(r"^---\s*$", text, flags=re.M)]
    head, step_chunks = chunks[0], [c for c in chunks[1:] if c]
    lines = head.splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"lesson {slug}: the file must start with '# Title'")
    title, summary = lines[0][2:].strip(), " ".join(x.strip() for x in lines[1:] if x.strip())
    steps = []
    for i, chunk in enumerate(step_chunks, 1):
        first, _, rest = chunk.partition("\n")
        m = _SETTINGS.match(first)
        if not m:
            raise ValueError(f"lesson {slug}, step {i}: the first line must be <!-- {{json settings}} -->")
        meta = json.loads(m.group(1))
        tab = meta.get("tab", "router")
        if tab not in TABS:
            raise ValueError(f"lesson {slug}, step {i}: unknown tab {tab!r}")
        hl = meta.get("highlight")
        if hl is not None and hl not in HIGHLIGHTS:
            raise ValueError(f"lesson {slug}, step {i}: unknown highlight {hl!r}")
        settings = {str(k): str(v) for k, v in meta.get("set", {}).items()}
        _, _, msgs = parse_query(settings)
        if msgs:
            raise ValueError(f"lesson {slug}, step {i}: " + " ".join(msgs))
        body = rest.strip()
        st = body.splitlines()[0] if body else ""
        if not st.startswith("## "):
            raise ValueError(f"lesson {slug}, step {i}: the step needs a '## Title' line")
        steps.append(Step(st[3:].strip(), body.partition("\n")[2].strip(), tab, hl, settings))
    if not steps:
        raise ValueError(f"lesson {slug}: no steps")
    return Lesson(slug, title, summary, steps)


@lru_cache(maxsize=1)
def lessons() -> dict[str, Lesson]:
    """Every lesson in assets/lessons, in file-name order, keyed by slug ("1-total-vs-active" -> "total-vs-active")."""
    out = {}
    for path in sorted(LESSON_DIR.glob("*.md")):
        slug = re.sub(r"^\d+-", "", path.stem)
        out[slug] = parse_lesson(slug, path.read_text(encoding="utf-8"))
    return out


def _pct(x: float) -> str:
    return f"{x:.0%}" if math.isfinite(x) else "?"


def _human(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def lesson_numbers(state, walkthrough=None) -> dict[str, str]:
    """The live figures a lesson step may quote, from the state's current RouteResult.

    `walkthrough(model, text, token, layer, **request)` computes the selected token's router
    walkthrough (default: `moe_core.analysis.explain.router_walkthrough`; the dashboard passes a cached one)."""
    from moe_core.analysis.explain import router_walkthrough
    from moe_core.analysis.metrics import balance_metrics

    res = state.result
    if res is None:
        return {}
    cfg = state.model.config
    layer = state.layer
    r = res.routings[layer]
    m = balance_metrics(r)
    load = r.dispatch.sum(0).double()
    p = res.params
    out = {
        "n_experts": str(cfg.n_experts), "n_layer": str(cfg.n_layer), "k": str(res.top_k or "-"),
        "total": _human(p.total), "active": _human(p.active_per_token), "active_share": _pct(p.active_share),
        "tokens": f"{len(res.tokens):,}", "layer": str(layer), "model": state.model_info["name"],
        "capacity": str(r.capacity) if r.capacity is not None else "no",
        "dropped": str(int(r.dropped.any(1).sum())), "drop_rate": _pct(m["drop_rate"]),
        "busiest_share": _pct(m["top1_max_share"]), "fair_share": _pct(1 / cfg.n_experts),
        "busiest_load": _pct(float(load.max() / load.sum()) if load.sum() else 0.0),
        "loss": f"{res.loss:.3f}" if res.loss is not None else "?",
    }
    nmi = state.model_info["card"].get("nmi_category")
    if nmi:
        out["nmi"] = f"{nmi[0]:.2f}"
    t = min(state.selected_token, len(res.tokens) - 1)
    try:
        w = (walkthrough or router_walkthrough)(state.model, state.text, t, layer, state.request())
    except ValueError:
        return out
    out.update(token_text=markdown_safe(w["token_text"].replace("\n", "\u21b5")), experts=" and ".join(map(str, w["experts"])),
               weights=" and ".join(f"{x:.3f}" for x in w["weights"]), chosen_prob_sum=_pct(w["chosen_prob_sum"]),
               max_abs_diff=f"{w['max_abs_diff']:.1e}")
    return out


def markdown_safe(text: str) -> str:
    """User text inside lesson Markdown: HTML escaped and Markdown punctuation backslash-escaped,
    so a token can neither inject HTML nor turn the rest of the step into a link or code."""
    text = re.sub(r"([\\`*_{}\[\]()#+\-.!|~])", r"\\\1", text)
    return html.escape(text, quote=True)


class _Filler(string.Formatter):
    """str.format showing ? for a missing name, and the plain value where a format spec does not fit."""

    def get_value(self, key, args, kwargs):
        if isinstance(key, str):
            return kwargs[key] if key in kwargs else "?"
        return super().get_value(key, args, kwargs)

    def format_field(self, value, format_spec):
        try:
            return super().format_field(value, format_spec)
        except (ValueError, TypeError):
            return str(value)


def fill(template: str, numbers: dict) -> str:
    """Fill {placeholders} of a lesson step or quiz text with live numbers: a name with no live value reads
    '?' and None 'n/a', rather than failing."""
    return _Filler().vformat(template, (), {k: ("n/a" if v is None else v) for k, v in numbers.items()})


class LessonState(param.Parameterized):
    """Which lesson is open and at which step; `go()` applies a step's settings to the router state."""

    lesson = param.String(default="", doc="Slug of the open lesson ('' = none).")
    step = param.Integer(default=0, bounds=(0, None), doc="Index of the current step (0-based).")

    def __init__(self, router_state, **params):
        super().__init__(**params)
        self.router_state = router_state

    @property
    def current(self) -> Lesson | None:
        return lessons().get(self.lesson)

    @property
    def current_step(self) -> Step | None:
        lesson = self.current
        return lesson.steps[self.step] if lesson else None

    def start(self, slug: str, step: int = 0) -> Step:
        if slug not in lessons():
            raise ValueError(f"there is no lesson {slug!r} (lessons: {', '.join(lessons())})")
        n = len(lessons()[slug].steps)
        if not 0 <= step < n:
            raise ValueError(f"lesson {slug!r} has steps 1 to {n}")
        self.param.update(lesson=slug, step=step)
        return self.go()

    def go(self) -> Step | None:
        """Apply the current step's settings to the router state (and every earlier step's, so
        jumping into the middle of a lesson gives the same view as walking there)."""
        lesson = self.current
        if lesson is None:
            return None
        merged: dict = {}
        for s in lesson.steps[: self.step + 1]:
            if "model" in s.settings:     # a new model resets what earlier steps set
                merged = {}
            merged.update(s.settings)
        settings, _, _ = parse_query(merged)
        apply_to_state(self.router_state, settings)
        return lesson.steps[self.step]

    def next(self) -> Step | None:
        lesson = self.current
        if lesson is None or self.step >= len(lesson.steps) - 1:
            return None
        self.step += 1
        return self.go()

    def prev(self) -> Step | None:
        if self.current is None or self.step == 0:
            return None
        self.step -= 1
        return self.go()

    def stop(self) -> None:
        self.param.update(lesson="", step=0)


__all__ = ["Lesson", "Step", "LessonState", "lessons", "lesson_numbers", "fill", "parse_lesson", "HIGHLIGHTS"]
