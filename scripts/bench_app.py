"""Dashboard latency benchmark: server-side routing + view updates, and the browser round trip.

    python scripts/bench_app.py [--tokens 512] [--repeats 15] [--browser] [--json]

1. Server side (in process): for a text of --tokens tokens, the time of
   RouterState.route() plus Dashboard._redraw() (every view rebuilt from the
   result), while k alternates between 2 and 3 so each update is real work.
2. Browser (--browser; needs chromium): a real `panel serve`, a headless
   chromium page; the time from releasing the k slider (a key press on its
   handle) until the first screen's routing record has changed in the page's Bokeh document,
   measured with the page's own clock.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def text_of_tokens(n: int) -> str:
    from app.state import examples
    from moe_core.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    base = "\n".join(examples().values())
    text = base
    while len(tok.encode(text)) < n:
        text += "\n" + base
    ids = tok.encode(text)[:n]
    return tok.decode(ids)


def server_side(n_tokens: int, repeats: int) -> dict:
    import panel as pn

    from app.dashboard import Dashboard
    from app.state import RouterState

    text = text_of_tokens(n_tokens)
    dash = Dashboard(state=RouterState(text=text))
    s = dash.state
    route_ms, total_ms = [], []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        with pn.io.hold():
            s.top_k = 3 if s.top_k == 2 else 2      # watchers route and redraw
        t1 = time.perf_counter()
        if i >= 2:                                    # two warm-up rounds
            route_ms.append(s.route_ms)
            total_ms.append((t1 - t0) * 1e3)
    return {"tokens": len(s.result.tokens), "route_ms_median": statistics.median(route_ms),
            "route_plus_views_ms_median": statistics.median(total_ms), "route_plus_views_ms_max": max(total_ms)}


def browser_round_trip(n_tokens: int, repeats: int) -> dict:
    import re
    import signal
    import subprocess
    import threading

    from playwright.sync_api import sync_playwright

    cmd = [sys.executable, "-m", "panel", "serve", "app/main.py", "--address", "127.0.0.1", "--port", "0",
           "--allow-websocket-origin", "*", "--num-procs", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(x) for x in iter(proc.stdout.readline, "")], daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            for line in list(lines):
                if m := re.search(r"Bokeh app running at: (http://\S+/main)\b", line):
                    url = m.group(1)
            time.sleep(0.05)
        if url is None:
            raise RuntimeError("panel serve did not start:\n" + "".join(lines))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"),
                                        args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            screen = "Bokeh.documents[0].get_model_by_name('router_screen')"
            page.wait_for_function(f"() => window.Bokeh && Bokeh.documents.length && {screen} && "
                                   f"{screen}.data.length > 2")
            box = page.locator("textarea").first
            box.fill(text_of_tokens(n_tokens))
            box.press("Tab")
            page.wait_for_function(f"() => JSON.parse({screen}.data).tokens.length >= {n_tokens - 2}", timeout=30_000)
            page.wait_for_timeout(500)
            handle = page.locator(".noUi-handle").first
            times = []
            for i in range(repeats + 1):
                page.evaluate("""() => { const m = Bokeh.documents[0].get_model_by_name('router_screen');
                    window.__t0 = null; window.__t1 = null;
                    if (!window.__hooked) { window.__hooked = true;
                        m.properties.data.change.connect(() => { window.__t1 = performance.now(); }); } }""")
                handle.focus()
                page.evaluate("() => { window.__t0 = performance.now(); }")
                handle.press("ArrowRight" if i % 2 == 0 else "ArrowLeft")
                page.wait_for_function("() => window.__t1 !== null", timeout=10_000)
                if i:
                    times.append(page.evaluate("() => window.__t1 - window.__t0"))
                page.wait_for_timeout(300)
            browser.close()
        return {"slider_to_screen_ms_median": statistics.median(times), "slider_to_screen_ms_max": max(times)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--browser", action="store_true", help="also measure the browser round trip")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.chdir(ROOT)
    res = {"machine": f"{os.cpu_count()} CPU threads", **server_side(args.tokens, args.repeats)}
    if args.browser:
        res.update(browser_round_trip(args.tokens, args.repeats))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:32s} {v:.1f}" if isinstance(v, float) else f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
