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


# Every element matching a selector in the document and all nested shadow roots (Panel renders
# each component in its own shadow root).
DEEP_ALL = """(sel) => { const out = [];
    const walk = (root) => { out.push(...root.querySelectorAll(sel));
        root.querySelectorAll('*').forEach(el => { if (el.shadowRoot) walk(el.shadowRoot); }); };
    walk(document); return out; }"""
SCREEN = f"(() => ({DEEP_ALL})('.screen')[0] || null)()"
# the routing record the screen draws (the Bokeh model's data, as sent by the server)
SCREEN_DATA = "JSON.parse(Bokeh.documents[0].get_model_by_name('router_screen').data || '{}')"


def open_app(page: Page, url: str) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.goto(url)
    page.wait_for_function(f"() => window.Bokeh && Bokeh.documents.length > 0 && "
                           f"Bokeh.documents[0].get_model_by_name('router_screen') !== null && {SCREEN} !== null "
                           f"&& Number({SCREEN}.dataset.seq) > 0")
    expect(page.locator(".view-tokens .tok").first).to_be_visible()
    return errors


def screen_seq(page: Page) -> int:
    """How many routings the screen has drawn (it counts them in data-seq)."""
    return page.evaluate(f"() => Number({SCREEN}.dataset.seq)")


def wait_redrawn(page: Page, seq: int) -> None:
    page.wait_for_function(f"(n) => Number({SCREEN}.dataset.seq) > n", arg=seq)


def token_texts(page: Page) -> list[str]:
    """The exact text of each token the screen shows (a newline is drawn as a mark: data-text keeps it)."""
    return page.evaluate(f"() => [...{SCREEN}.querySelectorAll('.view-tokens .tok')].map(s => s.dataset.text)")


def token_stripes(page: Page) -> list[list[str]]:
    """Per token, the experts of its colour stripes, as drawn (one stripe per expert that took it)."""
    return page.evaluate(f"""() => [...{SCREEN}.querySelectorAll('.view-tokens .tok')].map(
        t => [...t.querySelectorAll('.stripe')].map(s => s.dataset.e + (s.classList.contains('dropped') ? 'x' : '')))""")


def lit_experts(page: Page) -> list[int]:
    """The experts the decision view lights for the selected token."""
    return page.evaluate(f"""() => [...{SCREEN}.querySelectorAll('.view-decide .col')].map((c, e) => [c, e])
        .filter(([c]) => c.classList.contains('on')).map(([, e]) => e)""")


def deep_query(page: Page, selector: str) -> int:
    """How many elements match `selector` in the document and every (nested) shadow root."""
    return page.evaluate(f"(sel) => ({DEEP_ALL})(sel).length", selector)


def strip_numbers(page: Page) -> tuple[int, int]:
    """Total and active parameters, as the counters on the first screen show them."""
    got = page.evaluate(f"""() => ['total', 'active'].map(c =>
        {SCREEN}.querySelector('.view-counters .' + c + ' .big').textContent)""")
    return int(got[0].replace(",", "")), int(got[1].replace(",", ""))


JOINED_TOKENS = f"""(() => {{ const s = {SCREEN}; if (!s) return null;
    return [...s.querySelectorAll('.view-tokens .tok')].map(x => x.dataset.text).join(''); }})()"""


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
    # every token of layer 0 shows k = 2 stripes, the experts the server routed it to
    data = page.evaluate(f"() => {SCREEN_DATA}")
    assert data["k"] == 2 and [len(s) for s in token_stripes(page)] == [2] * len(texts)
    assert [[int(e) for e in s] for s in token_stripes(page)] == data["layers"][0]["top"]
    assert lit_experts(page) == sorted(data["layers"][0]["top"][0])     # token 0's two experts light up
    total, active = strip_numbers(page)
    assert total > active > 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app-1280x800.png"), full_page=False)
    assert [e for e in errors if not any(i in e for i in IGNORED)] == []


def test_typing_text_reroutes_the_tokens(page: Page, app_url):
    open_app(page, app_url)
    from moe_core.data.tokenizer import get_tokenizer

    text = "def add(a, b):\n    return a + b  # 12345"
    set_text(page, text)
    n = len(get_tokenizer().encode(text))
    texts = token_texts(page)
    assert len(texts) == n and "".join(texts) == text
    assert texts[-5:] == list("12345")          # digits are one token each
    assert len(token_stripes(page)) == n


def test_moving_k_from_2_to_4_changes_every_token_and_the_counters(page: Page, app_url):
    open_app(page, app_url)
    before = token_stripes(page)
    total, active = strip_numbers(page)
    seq = screen_seq(page)
    press_slider(page, "k (experts", "ArrowRight", "3")
    press_slider(page, "k (experts", "ArrowRight", "4")
    page.wait_for_function(f"() => {SCREEN_DATA}.k === 4 && Number({SCREEN}.dataset.seq) > {seq}")
    page.wait_for_function(f"() => [...{SCREEN}.querySelectorAll('.view-tokens .tok')].every("
                           f"t => t.querySelectorAll('.stripe').length === 4)")
    after = token_stripes(page)
    assert len(after) == len(before) and all(a != b for a, b in zip(after, before))   # every token changed
    assert all(len(a) == 4 and a[:2] == b for a, b in zip(after, before))   # the top 2 stay, 2 more light up
    assert len(lit_experts(page)) == 4
    # a short text is routed at once: no routing left waiting, no busy cue
    assert page.evaluate(f"() => {{ const m = Bokeh.documents[0].get_model_by_name('router_screen');"
                         f" return m.asked === m.answered && !{SCREEN}.classList.contains('busy'); }}")
    total4, active4 = strip_numbers(page)
    assert total4 == total and active4 > active      # compute follows k, memory does not
    page.screenshot(path=str(ARTIFACTS / "k4.png"))


def test_a_long_text_shows_the_busy_cue_until_its_routing_is_back(page: Page, app_url):
    from app.dashboard import SLOW_TEXT_CHARS
    from app.state import LIVE_TOKENS

    open_app(page, app_url)
    page.evaluate(f"""() => {{ window.__busy = []; const s = {SCREEN};
        new MutationObserver(() => window.__busy.push(s.classList.contains('busy')))
            .observe(s, {{attributes: true, attributeFilter: ['class']}}); }}""")
    text = ("The ferry left the harbour at half past six, later than anyone had promised. " * 40)[:SLOW_TEXT_CHARS + 400]
    set_text(page, text, wait=False)            # the live view routes its first LIVE_TOKENS tokens only
    page.wait_for_function(f"() => {{ const m = Bokeh.documents[0].get_model_by_name('router_screen');"
                           f" return m.asked >= 1 && m.asked === m.answered && !{SCREEN}.classList.contains('busy') && "
                           f"JSON.parse(m.data).tokens.length === {LIVE_TOKENS}; }}")
    expect(page.locator(".toast-msg").first).to_contain_text(f"the live view routes the first {LIVE_TOKENS}")
    assert page.evaluate("() => window.__busy") [:1] == [True]      # the cue went on first, then off


def test_switch_makes_the_k_control_and_the_active_counter_say_1(page: Page, app_url):
    open_app(page, app_url)
    seq = screen_seq(page)
    page.locator("select").filter(has_text="Softmax top-k").first.select_option(label="Switch top-1 with capacity")
    wait_redrawn(page, seq)
    expect(page.locator(".k-fixed").first).to_contain_text("k = 1: 1 expert per token (fixed by the scheme)")
    expect(page.locator(".bk-slider-title", has_text="k (experts").first).to_be_hidden()     # no k to set
    counter = page.evaluate(f"() => {SCREEN}.querySelector('.view-counters .active .sub').textContent")
    assert counter == "1 expert per token (fixed by the scheme)"
    assert len(lit_experts(page)) <= 1 and all(len(s) == 1 for s in token_stripes(page))
    page.screenshot(path=str(ARTIFACTS / "switch.png"))


def test_changing_n_changes_total_but_not_active(page: Page, app_url):
    open_app(page, app_url)
    total, active = strip_numbers(page)
    seq = screen_seq(page)
    page.get_by_role("button", name="16", exact=True).click()
    page.wait_for_function(f"() => {SCREEN_DATA}.n === 16 && Number({SCREEN}.dataset.seq) > {seq}")
    total16, active16 = strip_numbers(page)
    assert total16 > total
    # same expert width and k: active grows only by the router's extra rows (4 layers x d_model 128 x 8 more experts)
    assert active16 - active == 4 * 128 * (16 - 8)
    assert page.evaluate(f"() => {SCREEN}.querySelectorAll('.view-decide .col').length") == 16
    page.screenshot(path=str(ARTIFACTS / "app-n16.png"))


def test_a_layer_click_and_a_token_click_redraw_in_the_browser(page: Page, app_url):
    open_app(page, app_url)
    data = page.evaluate(f"() => {SCREEN_DATA}")
    page.evaluate(f"() => {SCREEN}.querySelector('button.layer-btn[data-layer=\"2\"]').click()")
    page.wait_for_function(f"() => {SCREEN}.dataset.layer === '2'")
    assert [[int(e) for e in s] for s in token_stripes(page)] == data["layers"][2]["top"]
    page.locator(".view-tokens .tok").nth(3).click()
    page.wait_for_function(f"() => {SCREEN}.querySelector('.view-decide .vtitle').textContent.includes('token 3')")
    assert lit_experts(page) == sorted(data["layers"][2]["top"][3])


PAYLOAD = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold</b>'


def test_html_in_user_text_is_shown_as_text_and_never_runs(page: Page, app_url):
    open_app(page, app_url)
    set_text(page, PAYLOAD)
    assert "".join(token_texts(page)) == PAYLOAD
    shown = page.evaluate(f"() => [...{SCREEN}.querySelectorAll('.view-tokens .tok .tx')].map(x => x.textContent)")
    assert "".join(shown) == PAYLOAD                   # what is drawn is the text itself, as text
    page.locator(".view-tokens .tok").nth(1).click()   # the decision view shows the selected token's text
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
    expect(page.locator(".toast-msg").first).to_contain_text("empty")
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
    """The experts the page shows are the ones the CLI reports for the same text."""
    import subprocess
    import sys

    text = "The cat sat on the mat. 2024"
    open_app(page, app_url)
    set_text(page, text)
    out = subprocess.run([sys.executable, "-m", "moe_core", "route", text, "--model", "moe-n8", "--json"],
                         capture_output=True, text=True, check=True).stdout
    layer0 = json.loads(out)["layers"][0]
    expected = sorted((t, e) for t, es in enumerate(layer0["experts"]) for e in es)
    data = page.evaluate(f"() => {SCREEN_DATA}")
    shown = sorted((t, e) for t, (es, kept) in enumerate(zip(data["layers"][0]["top"], data["layers"][0]["kept"]))
                   for e, k in zip(es, kept) if k)
    assert shown == expected


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
    page.wait_for_function(f"() => {SCREEN_DATA}.k === 3")
    assert [len(s) for s in token_stripes(page)] == [3] * n_tokens
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
    page.locator(".lab-layer").get_by_role("button", name="layer 1").click()
    page.wait_for_function("() => [...Bokeh.documents[0].all_models].some(m => typeof m.text === 'string' && "
                           "m.text.includes('share of first choices per expert, layer 1'))")
    assert page.evaluate("() => Bokeh.documents[0].get_model_by_name('lab_share_0').data.step") == list(range(1, 21))
    page.screenshot(path=str(ARTIFACTS / "lab.png"))
    use = page.get_by_role("button", name="Route text with this model")
    expect(use).to_be_enabled()
    use.click()
    page.get_by_text("Router", exact=True).first.click()
    expect(page.locator(".badge-ok, .badge-warn").first).to_contain_text("trained in the lab")
    # the lab model has 2 layers: the screen offers exactly those
    page.wait_for_function(f"() => {SCREEN_DATA}.layers.length === 2 && "
                           f"{SCREEN}.querySelectorAll('button.layer-btn').length === 2")
