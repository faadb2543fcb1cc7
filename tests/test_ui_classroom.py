"""Browser tests of the classroom features: share links, a full lesson by keyboard, compare mode."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import ARTIFACTS
from tests.test_ui import JOINED_TOKENS, SCREEN, SCREEN_DATA, open_app

pytestmark = pytest.mark.ui


def wait_loaded(page: Page, url: str) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.goto(url)
    page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0")
    return errors


def test_a_share_link_opens_exactly_that_view(page: Page, app_url):
    errors = wait_loaded(page, app_url + "?model=moe-n8-nobalance&k=3&example=Python%20code&tab=compare")
    # the Compare tab is open and routes the linked text with the linked model and k
    page.wait_for_function("() => { const m = Bokeh.documents[0].get_model_by_name('compare_load');"
                           " return m !== null && m.data.x.length > 0; }")
    expect(page.get_by_text("moe-n8-nobalance, Softmax top-k (Mixtral), k = 3").first).to_be_visible()
    # the header's link button reproduces the link
    page.get_by_role("button", name="Link to this view").click()
    link = page.locator(".share-url input").first
    expect(link).to_be_visible()
    expect(link).to_have_value(re.compile("model=moe-n8-nobalance"))
    value = link.input_value()
    assert "model=moe-n8-nobalance" in value and "k=3" in value and "tab=compare" in value
    assert "example=Python+code" in value
    # opening the produced link in a new page shows the same text routed
    other = page.context.new_page()
    wait_loaded(other, value.replace("tab=compare", "tab=router"))
    other.wait_for_function(f"() => ({JOINED_TOKENS} || '').startsWith('def ')")
    assert other.evaluate(f"() => {SCREEN_DATA}.k") == 3
    assert [e for e in errors if "favicon" not in e] == []


def test_a_lesson_link_with_hidden_controls_walks_by_keyboard(page: Page, app_url):
    wait_loaded(page, app_url + "?lesson=capacity&hide=controls")
    def step_label(i: int):
        return page.get_by_text(re.compile(rf"Load imbalance .* step {i} of 3"))

    expect(step_label(1)).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Slots per expert").first).to_be_visible()
    page.locator("body").click(position={"x": 5, "y": 300})    # focus the page, not a widget
    page.keyboard.press("ArrowRight")
    expect(step_label(2)).to_be_attached(timeout=30_000)
    expect(page.get_by_text("Squeeze: capacity factor 0.5").first).to_be_visible()
    expect(page.get_by_text(re.compile(r"In layer 0, \d+ tokens \(\d+%\) are dropped"))).to_be_attached()
    # the numbers quoted come from the live model: drops are shown struck out in the text
    page.wait_for_function(f"() => {SCREEN_DATA}.layers[0].kept.some(r => r.includes(0)) && "
                           f"{SCREEN}.querySelectorAll('.view-tokens .stripe.dropped').length > 0")
    page.keyboard.press(" ")
    expect(step_label(3)).to_be_attached(timeout=30_000)
    page.keyboard.press("ArrowLeft")
    expect(step_label(2)).to_be_attached(timeout=30_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "lesson.png"))
    page.get_by_role("button", name="Close lesson").click()
    expect(step_label(2)).to_be_hidden()


def test_compare_mode_shows_divergence_per_layer(page: Page, app_url):
    open_app(page, app_url)
    page.get_by_text("Compare", exact=True).first.click()
    page.wait_for_function("() => { const m = Bokeh.documents[0].get_model_by_name('compare_load');"
                           " return m !== null && m.data.x.length > 0; }")
    expect(page.get_by_text("Per-layer divergence between A and B").first).to_be_visible()
    page.get_by_role("button", name="B = A, then change one thing").click()
    expect(page.get_by_text("same first choice").first).to_be_visible(timeout=15_000)
    expect(page.get_by_text("Same weights on both sides").first).to_be_visible()


# The focused element, through Panel's nested shadow roots.
DEEP_ACTIVE = """() => { let a = document.activeElement;
    while (a && a.shadowRoot && a.shadowRoot.activeElement) a = a.shadowRoot.activeElement;
    if (!a) return null;
    const cs = getComputedStyle(a);
    return {tag: a.tagName.toLowerCase(), text: (a.innerText || a.value || a.getAttribute('aria-label') || '').slice(0, 40),
            ring: cs.outlineStyle !== 'none' && parseFloat(cs.outlineWidth) > 0 || cs.boxShadow !== 'none'}; }"""


def test_every_control_is_reachable_by_keyboard_with_a_visible_focus(page: Page, app_url):
    open_app(page, app_url)
    page.locator("body").click(position={"x": 5, "y": 5})
    seen = []
    for _ in range(80):
        page.keyboard.press("Tab")
        info = page.evaluate(DEEP_ACTIVE)
        if info and info["tag"] != "body":
            seen.append(info)
    tags = {s["tag"] for s in seen}
    texts = " | ".join(s["text"] for s in seen)
    assert {"select", "textarea", "button"} <= tags, tags
    assert "Route" in texts and "Link to this view" in texts and "Layer 1" in texts and "Play" in texts, texts
    unringed = [s for s in seen if not s["ring"]]
    assert not unringed, f"focused without a visible focus indicator: {unringed[:5]}"
