"""What a student sees on the first screen, as boxes: on a laptop, a projector, in presenter mode and narrow.

For each state the test reads the element boxes through Panel's shadow roots and asserts
that the router's decision, the text and the load lie inside the first viewport, that no two
views overlap, that nothing is wider than the window and that a lesson card covers none of
the view it frames. Every request the page makes is recorded: a classroom network may have
no internet, so any non-local request fails the test. Screenshots go to artifacts/layout-*.png.
"""
from __future__ import annotations

from urllib.parse import urlparse

import pytest
from playwright.sync_api import Browser, expect

from app.lessons import lessons
from tests.conftest import ARTIFACTS
from tests.test_ui import SCREEN, open_app

pytestmark = pytest.mark.ui

FIRST_SCREEN = ("view-decide", "view-tokens", "view-load")
VIEWS = (*FIRST_SCREEN, "view-counters", "lesson-bar", "controls", "input-row", "app-header")
BOXES = """(classes) => {
  const out = {};
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      for (const c of classes) {
        if (el.classList && el.classList.contains(c) && !(c in out)) {
          const r = el.getBoundingClientRect();
          if (r.width > 0 && r.height > 0) out[c] = {x: r.left, y: r.top, w: r.width, h: r.height};
        }
      }
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  return out;
}"""
SIZES = {"laptop": (1366, 768), "projector": (1920, 1080)}


def overlap(a: dict, b: dict, slack: float = 2.0) -> bool:
    dx = min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"])
    dy = min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"])
    return dx > slack and dy > slack


def local_only(context) -> list[str]:
    """Abort and record every request to a host other than this machine."""
    seen: list[str] = []

    def handle(route):
        host = urlparse(route.request.url).hostname
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            seen.append(route.request.url)
            route.abort()
    context.route("**/*", handle)
    return seen


def check_boxes(page, name: str, views, inside) -> dict:
    """What a user sees: every view in `inside` shown within the first viewport, none of `views` overlapping
    another, the page no wider than the window; a screenshot artifacts/NAME.png. Returns the boxes."""
    page.wait_for_timeout(700)          # the views fit themselves to the viewport within 300 ms
    boxes = page.evaluate(BOXES, list(views))
    w, h = page.evaluate("() => [innerWidth, innerHeight]")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    for view in inside:
        b = boxes.get(view)
        assert b is not None, f"{name}: {view} is not shown"
        assert b["x"] >= 0 and b["y"] >= 0 and b["x"] + b["w"] <= w + 0.5 and b["y"] + b["h"] <= h + 0.5, \
            f"{name}: {view} {b} is not inside the first viewport {w}x{h}"
    shown = list(boxes.items())
    for i, (a, ba) in enumerate(shown):
        for c, bc in shown[i + 1:]:
            assert not overlap(ba, bc), f"{name}: {a} {ba} overlaps {c} {bc}"
    assert page.evaluate("() => document.documentElement.scrollWidth <= innerWidth"), \
        f"{name}: the page is wider than the window"
    return boxes


def check_first_screen(page, name: str, focus: str | None = None) -> dict:
    boxes = check_boxes(page, f"layout-{name}", VIEWS, FIRST_SCREEN)
    if focus:
        assert f"view-{focus}" in boxes and "lesson-bar" in boxes
        assert not overlap(boxes["lesson-bar"], boxes[f"view-{focus}"], slack=0)
        framed = page.evaluate(f"(c) => {SCREEN}.querySelector('.' + c).classList.contains('lesson-focus')",
                               f"view-{focus}")
        assert framed, f"{name}: the lesson does not frame view-{focus}"
    return boxes


@pytest.mark.parametrize("presenter", [False, True], ids=["plain", "presenter"])
@pytest.mark.parametrize("size", list(SIZES))
def test_router_tab_and_every_lessons_first_step_fit_one_screen(browser: Browser, app_url, size, presenter):
    ctx = browser.new_context(viewport=dict(zip(("width", "height"), SIZES[size])))
    outside = local_only(ctx)
    page = ctx.new_page()
    tag = f"{size}{'-presenter' if presenter else ''}"
    try:
        open_app(page, app_url + ("?presenter=1" if presenter else ""))
        check_first_screen(page, f"router-{tag}")
        for slug, lesson in lessons().items():
            step = lesson.steps[0]
            assert step.tab == "router", f"lesson {slug} should start on the Router tab's first screen"
            open_app(page, app_url + f"?lesson={slug}" + ("&presenter=1" if presenter else ""))
            page.wait_for_function(f"(f) => {SCREEN}.querySelector('.view-' + f + '.lesson-focus') !== null",
                                   arg=step.highlight)
            check_first_screen(page, f"lesson-{slug}-{tag}", focus=step.highlight)
    finally:
        ctx.close()
    assert outside == [], f"the page asked the internet for {outside}"


@pytest.mark.parametrize("width", [768, 390])
def test_a_narrow_screen_stacks_the_views_and_keeps_the_text_wide(browser: Browser, app_url, width):
    ctx = browser.new_context(viewport={"width": width, "height": 1024})
    page = ctx.new_page()
    try:
        open_app(page, app_url)
        page.wait_for_timeout(500)
        boxes = page.evaluate(BOXES, list(VIEWS))
        # 768 px (a small laptop, a tablet): the text keeps 600 px; 390 px (a phone): nearly the whole width
        assert boxes["view-tokens"]["w"] >= min(600, 0.9 * width), boxes["view-tokens"]
        assert page.evaluate("() => document.documentElement.scrollWidth <= innerWidth")
        for a, b in (("view-decide", "view-tokens"), ("view-tokens", "view-load"), ("view-load", "view-counters"),
                     ("app-header", "input-row"), ("input-row", "controls")):
            assert not overlap(boxes[a], boxes[b]), (a, b)
        page.screenshot(path=str(ARTIFACTS / f"layout-{width}.png"), full_page=True)
    finally:
        ctx.close()


def test_no_view_asks_the_internet(browser: Browser, app_url):
    """Every tab, the details views and the quiz's "Show me in the router": nothing leaves this machine."""
    ctx = browser.new_context(viewport={"width": 1366, "height": 768})
    outside = local_only(ctx)
    page = ctx.new_page()
    try:
        open_app(page, app_url)
        for tab in ("Router details", "Compare", "Expert profiles", "Training lab", "Parameters", "Scale", "Quiz",
                    "Learn"):
            page.get_by_text(tab, exact=True).first.click()
            page.wait_for_timeout(1200)
        # the quiz: answer the first question, then "Show me in the router" (it changes the routing while
        # the Router tab is hidden, which once made Panel fetch the Router's stylesheets from its CDN)
        from app.quiz import QuizState

        quiz = QuizState()
        page.get_by_text("Quiz", exact=True).first.click()
        page.get_by_label(quiz.current.options[0], exact=True).check()
        page.get_by_role("button", name="Check", exact=True).click()
        show = page.get_by_role("button", name="Show me in the router")
        expect(show).to_be_enabled(timeout=30_000)
        show.click()
        page.wait_for_function(f"() => {SCREEN} !== null && {SCREEN}.getBoundingClientRect().width > 0")
        page.get_by_text("Router details", exact=True).first.click()
        page.wait_for_timeout(1500)
    finally:
        ctx.close()
    assert outside == [], f"the page asked the internet for {outside}"
