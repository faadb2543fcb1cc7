"""Browser security and isolation against the real server: payloads in every text field and URL
parameter never run, sessions never see each other's text, no file outside the app is served."""
import pytest
import requests
from playwright.sync_api import Browser, Page, expect

from tests.conftest import wait_until_served
from tests.test_ui import JOINED_TOKENS, SCREEN_DATA, open_app, press_slider, set_text, token_stripes, token_texts

pytestmark = pytest.mark.ui

PAYLOADS = [
    '<img src=x onerror="window.__pwned=1;alert(1)">',
    "<script>window.__pwned=2;alert(2)</script>",
    '"><svg onload="window.__pwned=3">',
    "javascript:alert(4)",
    "<iframe srcdoc='<script>parent.__pwned=5</script>'></iframe>",
]


def watch_dialogs(page: Page) -> list[str]:
    seen: list[str] = []
    page.on("dialog", lambda d: (seen.append(d.message), d.dismiss()))
    return seen


def test_payloads_in_every_text_field_never_run(page: Page, app_url):
    dialogs = watch_dialogs(page)
    open_app(page, app_url)
    for payload in PAYLOADS:
        set_text(page, payload)                     # the router's text box
        page.locator(".tok").nth(0).click()         # shows the token in the detail pane too
    page.get_by_text("Training lab", exact=True).first.click()
    seed = (page.locator(".bk-input-group").filter(has=page.get_by_text("Seed", exact=True))
            .locator("input").first)                  # the lab's only typed field is the numeric seed
    seed.fill(PAYLOADS[0])
    seed.press("Enter")
    page.wait_for_timeout(800)
    assert page.evaluate("() => window.__pwned === undefined") and dialogs == []


@pytest.mark.parametrize("query", [
    "?text=%3Cscript%3Ewindow.__pwned%3D1%3C%2Fscript%3E&k=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E",
    "?k=abc&n_experts=-5&scheme=%22%3E%3Csvg%20onload%3Dalert(1)%3E&capacity_factor=NaN&layer=99",
    "?%3Cscript%3E=1",
])
def test_url_parameters_are_inert(page: Page, app_url, query):
    dialogs = watch_dialogs(page)
    errors = open_app(page, app_url + query)
    assert len(token_texts(page)) > 5                 # the app works as usual
    assert page.evaluate("() => window.__pwned === undefined") and dialogs == []
    assert [e for e in errors if "favicon" not in e] == []


def test_two_sessions_never_see_each_others_text_or_settings(browser: Browser, app_url):
    a_ctx, b_ctx = browser.new_context(), browser.new_context()
    try:
        a, b = a_ctx.new_page(), b_ctx.new_page()
        open_app(a, app_url)
        open_app(b, app_url)
        set_text(a, "alpha session text 111")
        set_text(b, "bravo session text 222")
        press_slider(b, "k (experts", "ArrowRight", "3")   # B moves to k = 3
        b.wait_for_function(f"() => {SCREEN_DATA}.k === 3")
        a.wait_for_timeout(500)
        assert "".join(token_texts(a)) == "alpha session text 111"
        assert "".join(token_texts(b)) == "bravo session text 222"
        n_a = len(token_texts(a))
        assert [len(x) for x in token_stripes(a)] == [2] * n_a and a.evaluate(f"() => {SCREEN_DATA}.k") == 2
        assert a.evaluate(f"() => {JOINED_TOKENS}") == "alpha session text 111"
    finally:
        a_ctx.close()
        b_ctx.close()


@pytest.mark.parametrize("path", [
    "/static/../../pyproject.toml", "/static/%2e%2e/%2e%2e/pyproject.toml", "/main/../pyproject.toml",
    "/assets/checkpoints/moe-n8.safetensors", "/..%2fpyproject.toml", "/static/..%2f..%2fREADME.md",
    "/app/main.py", "/moe_core/cli.py",
])
def test_no_file_outside_the_app_is_served(app_url, path):
    base = app_url.rsplit("/", 1)[0]
    r = requests.get(base + path, timeout=10)
    assert r.status_code in (400, 403, 404), (path, r.status_code)
    assert "[project]" not in r.text and "def main" not in r.text


def test_websocket_from_a_foreign_origin_is_refused_by_the_cli_server():
    """`moe-lab serve` (what `make serve` runs) allows only localhost origins by default."""
    import asyncio
    import os
    import signal
    import socket
    import subprocess
    import sys

    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.websocket import websocket_connect

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moe_core", "serve", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    async def handshake(origin: str) -> int:
        req = HTTPRequest(f"ws://127.0.0.1:{port}/main/ws", headers={"Origin": origin})
        try:
            conn = await websocket_connect(req)
        except HTTPClientError as e:
            return e.code
        conn.close()
        return 101

    try:
        assert wait_until_served(f"http://127.0.0.1:{port}/main", 90)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:   # its own event loop (Playwright's runs in this thread)
            assert pool.submit(asyncio.run, handshake("http://evil.example")).result() == 403
            assert pool.submit(asyncio.run, handshake(f"http://localhost:{port}")).result() != 403
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_a_value_no_control_offers_is_refused_with_a_message(page: Page, app_url):
    """A crafted websocket message (k = 999 set on the slider's model in the page) changes nothing on the
    server: the page says so, the slider shows k = 2 again, and the next real change still routes."""
    open_app(page, app_url)
    before = token_stripes(page)
    page.evaluate("""() => { const m = [...Bokeh.documents[0].all_models].find(m => m.title === 'k (experts per token)');
                             m.value = 999; m.value_throttled = 999; }""")
    expect(page.locator(".toast-msg").first).to_contain_text("not applied")
    expect(page.locator(".bk-slider-title", has_text="k (experts per token)").first).to_contain_text("2")
    assert token_stripes(page) == before and page.evaluate(f"() => {SCREEN_DATA}.k") == 2
    press_slider(page, "k (experts per token)", "ArrowRight", "3")
    expect(page.locator(".bk-slider-title", has_text="k (experts per token)").first).to_contain_text("3")
    page.wait_for_function(f"() => {SCREEN_DATA}.k === 3")
