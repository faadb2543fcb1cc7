"""Browser tests: Playwright drives Debian's chromium against a real `panel serve app/main.py`.

Assertions read what the page really shows: the token spans in the DOM and the
Bokeh models' data (by name) in the page's Bokeh document. Screenshots go to
artifacts/ for people to look at.
"""
from __future__ import annotations

import json

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.ui

# Errors a browser prints that are not ours (favicon requests and similar).
IGNORED = ("favicon",)


def model_data(page: Page, name: str, field: str | None = None):
    js = ("([n, f]) => { const m = Bokeh.documents[0].get_model_by_name(n); if (!m) return null;"
          " const d = m.data; if (!f) return Object.keys(d).length ? d[Object.keys(d)[0]].length : 0;"
          " return Array.from(d[f]); }")
    return page.evaluate(js, [name, field])


def open_app(page: Page, url: str) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.goto(url)
    page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && "
                           "Bokeh.documents[0].get_model_by_name('heat_cells_0') !== null")
    # the token view's own spans (`.tok` alone also matches the token shown in the detail pane, which
    # can render first: token_texts then found no block, a flaky failure)
    expect(page.locator(".tok-text .tok").first).to_be_visible()
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('heat_cells_0').data.t.length > 0")
    return errors


# Every element matching a selector in the document and all nested shadow roots (Panel renders
# each component in its own shadow root).
DEEP_ALL = """(sel) => { const out = [];
    const walk = (root) => { out.push(...root.querySelectorAll(sel));
        root.querySelectorAll('*').forEach(el => { if (el.shadowRoot) walk(el.shadowRoot); }); };
    walk(document); return out; }"""
FIRST_TOKEN_BLOCK = f"(() => {{ const all = ({DEEP_ALL})('.tok-text'); return all.length ? all[0] : null; }})()"


def token_texts(page: Page) -> list[str]:
    """The text of each token span of the first layer block (without the expert-number subscript)."""
    return page.evaluate(f"""() => {{ const block = {FIRST_TOKEN_BLOCK};
        if (!block) return [];
        return [...block.querySelectorAll('.tok')].map(s => s.firstChild ? s.firstChild.textContent : ''); }}""")


def deep_query(page: Page, selector: str) -> int:
    """How many elements match `selector` in the document and every (nested) shadow root."""
    return page.evaluate(f"(sel) => ({DEEP_ALL})(sel).length", selector)


def strip_numbers(page: Page) -> tuple[int, int]:
    total = page.locator("[data-testid=total]").first.inner_text()
    active = page.locator("[data-testid=active]").first.inner_text()
    return int(total.replace(",", "")), int(active.replace(",", ""))


JOINED_TOKENS = f"""(() => {{ const block = {FIRST_TOKEN_BLOCK}; if (!block) return null;
    return [...block.querySelectorAll('.tok')].map(s => s.firstChild ? s.firstChild.textContent : '').join(''); }})()"""


def set_text(page: Page, text: str, wait: bool = True) -> None:
    box = page.locator("textarea").first
    box.fill(text)
    box.press("Tab")     # commit (routing also follows typing after a short pause)
    if wait:             # until the page shows the new text as tokens
        page.wait_for_function(f"(t) => {JOINED_TOKENS} === t", arg=text)


def test_page_loads_without_errors_and_shows_real_routing(page: Page, app_url):
    errors = open_app(page, app_url)
    texts = token_texts(page)
    assert len(texts) > 5
    # the heatmap outlines exactly k=2 experts for every token of layer 0
    assert model_data(page, "heat_cells_0", "t") and len(model_data(page, "heat_cells_0", "t")) == 2 * len(texts)
    total, active = strip_numbers(page)
    assert total > active > 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app-1280x800.png"), full_page=False)
    assert [e for e in errors if not any(i in e for i in IGNORED)] == []


def test_typing_text_reroutes_tokens_and_heatmap(page: Page, app_url):
    open_app(page, app_url)
    from moe_core.tokenizer import get_tokenizer

    text = "def add(a, b):\n    return a + b  # 12345"
    set_text(page, text)
    n = len(get_tokenizer().encode(text))
    page.wait_for_function(f"() => Bokeh.documents[0].get_model_by_name('heat_cells_0').data.t.length === 2 * {n}")
    texts = token_texts(page)
    assert len(texts) == n and "".join(texts) == text
    assert texts[-5:] == list("12345")          # digits are one token each


def test_k_slider_changes_counters_and_heatmap(page: Page, app_url):
    open_app(page, app_url)
    n_tokens = len(token_texts(page))
    total, active = strip_numbers(page)
    press_slider(page, "k (experts", "ArrowRight", "3")
    page.wait_for_function(f"() => Bokeh.documents[0].get_model_by_name('heat_cells_0').data.t.length === "
                           f"3 * {n_tokens}")
    expect(page.locator("[data-testid=active]").first).not_to_have_text(f"{active:,}")
    total3, active3 = strip_numbers(page)
    assert total3 == total and active3 > active      # compute follows k, memory does not


def test_changing_n_changes_total_but_not_active(page: Page, app_url):
    open_app(page, app_url)
    total, active = strip_numbers(page)
    page.get_by_role("button", name="16", exact=True).click()
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('heat_image_0').data.dh[0] === 16")
    expect(page.locator("[data-testid=total]").first).not_to_have_text(f"{total:,}")
    total16, active16 = strip_numbers(page)
    assert total16 > total
    # same expert width and k: active grows only by the router's extra rows (4 layers x d_model 128 x 8 more experts)
    assert active16 - active == 4 * 128 * (16 - 8)
    page.screenshot(path=str(ARTIFACTS / "app-n16.png"))


PAYLOAD = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold</b>'


def test_html_in_user_text_is_shown_as_text_and_never_runs(page: Page, app_url):
    open_app(page, app_url)
    set_text(page, PAYLOAD)
    assert "".join(token_texts(page)) == PAYLOAD
    page.locator(".tok").nth(1).click()              # the detail pane shows the selected token's text
    page.wait_for_timeout(500)
    assert page.evaluate("() => window.__pwned === undefined")
    assert deep_query(page, "img[src=x]") == 0
    assert deep_query(page, ".tok") > 0                 # the walker does see into shadow roots
    assert deep_query(page, "script:not([src])") == page.evaluate(
        "() => document.querySelectorAll('script:not([src])').length")  # no script injected in shadow roots


def test_empty_text_notifies_and_keeps_the_last_result(page: Page, app_url):
    open_app(page, app_url)
    before = token_texts(page)
    set_text(page, "", wait=False)
    expect(page.locator(".notyf__toast").first).to_contain_text("empty")
    assert token_texts(page) == before


def test_projector_layout_screenshot(browser, app_url):
    ctx = browser.new_context(viewport={"width": 1920, "height": 1080})
    page = ctx.new_page()
    try:
        open_app(page, app_url)
        # nothing overflows the viewport horizontally at projector resolution
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1")
        page.screenshot(path=str(ARTIFACTS / "app-1920x1080.png"))
    finally:
        ctx.close()


def test_route_json_matches_what_the_page_shows(page: Page, app_url):
    """The page's heatmap outlines are the same experts the CLI reports for the same text."""
    import subprocess
    import sys

    text = "The cat sat on the mat. 2024"
    open_app(page, app_url)
    set_text(page, text)
    out = subprocess.run([sys.executable, "-m", "moe_core", "route", text, "--model", "moe-n8", "--json"],
                         capture_output=True, text=True, check=True).stdout
    layer0 = json.loads(out)["layers"][0]
    expected = sorted((t, e) for t, es in enumerate(layer0["experts"]) for e in es)
    ts, es = model_data(page, "heat_cells_0", "t"), model_data(page, "heat_cells_0", "e")
    assert sorted(zip(ts, es)) == expected


def press_slider(page: Page, title: str, key: str, shows: str, tries: int = 3) -> None:
    """Press `key` on the slider titled `title` until its title shows `shows` (a key press that lands
    before the slider's keyboard handler is attached is otherwise lost, and the test would flake)."""
    label = page.locator(".bk-slider-title", has_text=title).first
    for _ in range(tries):
        handle = slider_handle(page, title)
        handle.focus()
        handle.press(key)
        try:
            expect(label).to_contain_text(shows, timeout=5_000)
            return
        except AssertionError:
            continue
    expect(label).to_contain_text(shows)


def slider_handle(page: Page, title: str):
    """The noUiSlider handle of the Panel slider whose title starts with `title`."""
    group = page.locator(".bk-input-group").filter(has=page.locator(".bk-slider-title", has_text=title))
    return group.locator(".noUi-handle").first


def change_and_click(page: Page, title: str, value, button: str) -> None:
    """Set the control titled `title` and click `button` in the same JS tick, as a quick teacher does.

    The click then reaches the server inside Panel's 50 ms debounce of the change, and Panel 1.9 runs
    such a click without Bokeh's document lock: every time, not only when the machine is slow. The
    lab's Train once raised "_pending_writes should be non-None" there and trained nothing."""
    page.evaluate(f"""([title, value, label]) => {{
        const control = [...Bokeh.documents[0].all_models].find(m => m.title === title && 'value' in m);
        const button = ({DEEP_ALL})('button').find(b => b.textContent.trim() === label);
        if (!control || !button) throw new Error(`no control ${{title}} or button ${{label}}`);
        control.value = value;
        if ('value_throttled' in control) control.value_throttled = value;   // a slider's handle let go
        button.click(); }}""", [title, value, button])


def test_a_control_moved_and_route_clicked_at_once_both_apply(page: Page, app_url):
    open_app(page, app_url)
    n_tokens = len(token_texts(page))
    change_and_click(page, "k (experts per token)", 3, "Route")
    page.wait_for_function(f"() => Bokeh.documents[0].get_model_by_name('heat_cells_0').data.t.length === "
                           f"3 * {n_tokens}")
    expect(page.locator(".status-line").first).not_to_contain_text("rror")


def test_training_lab_trains_live_and_the_model_can_route_text(page: Page, app_url):
    open_app(page, app_url)
    page.get_by_text("Training lab", exact=True).first.click()
    press_slider(page, "Steps", "Home", "20")             # the fewest steps: 20
    change_and_click(page, "Seed", 1, "Train")
    # the loss curve and the per-expert share plot fill in while it trains
    page.wait_for_function("() => { const m = Bokeh.documents[0].get_model_by_name('lab_loss_0');"
                           " return m && m.data.step.length >= 3; }")
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('lab_share_0').data.step.length >= 3")
    expect(page.locator("[data-testid=lab-status]").first).to_contain_text("step")
    # the last poll sends the status and the last steps together; then each of the 20 steps is drawn once
    expect(page.locator("[data-testid=lab-status]").first).to_contain_text("done", timeout=120_000)
    assert page.evaluate("() => Bokeh.documents[0].get_model_by_name('lab_loss_0').data.step") == list(range(1, 21))
    # the share plot redrawn for layer 1 (its new title comes in the same message as its data): 20 steps, once each
    page.locator("#main").get_by_role("button", name="layer 1").click()
    page.wait_for_function("() => [...Bokeh.documents[0].all_models].some(m => typeof m.text === 'string' && "
                           "m.text.includes('share of first choices per expert, layer 1'))")
    assert page.evaluate("() => Bokeh.documents[0].get_model_by_name('lab_share_0').data.step") == list(range(1, 21))
    page.screenshot(path=str(ARTIFACTS / "lab.png"))
    use = page.get_by_role("button", name="Route text with this model")
    expect(use).to_be_enabled()
    use.click()
    page.get_by_text("Router", exact=True).first.click()
    expect(page.locator(".badge-ok, .badge-warn").first).to_contain_text("trained in the lab")
    # the lab model has 2 layers: the heatmap of layer 0 is routed by it
    page.wait_for_function("() => Bokeh.documents[0].get_model_by_name('heatmap_2').visible === false")
